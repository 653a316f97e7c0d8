"""Managed PostgreSQL (issue 20, items 2 and 4): TLS with certificate checks against a
cluster of the test's own, the production guard against plain TCP to another machine, and
a failover from a primary to its promoted streaming replica under a client loop."""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import cloudchat
from tests.conftest import ServerFactory, unavailable
from tests.helpers import (
    CHEAP_ARGON2,
    HIGH_LIMITS,
    TEST_SECRET_KEY,
    Client,
    Response,
    Server,
    SilentTcpServer,
    assert_error,
    base_env,
    free_port,
    random_email,
    register_and_login,
    run_cli,
    strong_password,
    wait_until,
)

PG_BINARIES = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
PG_OWNER = "postgres"  # PostgreSQL refuses to run as root: root runs it as this user
DB_NAME = "cloudchat"


# -- PostgreSQL clusters of the test's own ---------------------------------------------------


def _pg_bindir() -> Path | None:
    """The folder holding every PostgreSQL binary these tests run, or None."""
    folders = []
    found = shutil.which("pg_ctl")
    if found:
        folders.append(Path(os.path.realpath(found)).parent)
    folders += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in folders:
        if all((folder / name).is_file() for name in PG_BINARIES):
            return folder
    return None


@dataclass(frozen=True)
class PgTools:
    """Where the binaries are, and who runs them (`postgres` through runuser when root)."""

    bindir: Path
    owner: str | None

    def run(self, binary: str, *args: str, cwd: Path, timeout: float = 60) -> str:
        """Run one binary as the cluster owner; its output, or AssertionError with it."""
        prefix = ["runuser", "-u", self.owner, "--"] if self.owner else []
        done = subprocess.run(
            [*prefix, str(self.bindir / binary), *args],
            cwd=str(cwd),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{binary} {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done.stdout

    def own(self, path: Path) -> None:
        """Give a file or folder to the cluster owner."""
        if self.owner:
            shutil.chown(path, self.owner, self.owner)

    def mkdtemp(self, prefix: str) -> Path:
        """A fresh folder in /tmp owned by the cluster owner (root's tmp_path is not
        reachable for it); short, so that unix socket paths fit."""
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.own(folder)
        return folder


@functools.cache
def _find_pg_tools() -> PgTools | str:
    """PgTools, or why the PostgreSQL tests cannot run here."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed"
    bindir = _pg_bindir()
    if bindir is None:
        return f"PostgreSQL binaries ({', '.join(PG_BINARIES)}) are not installed"
    if os.geteuid() != 0:
        return PgTools(bindir, None)
    if not shutil.which("runuser"):
        return "running as root and runuser is missing (PostgreSQL refuses to run as root)"
    try:
        pwd.getpwnam(PG_OWNER)
    except KeyError:
        return f"running as root and there is no {PG_OWNER!r} user to run PostgreSQL as"
    return PgTools(bindir, PG_OWNER)


@pytest.fixture(scope="module")
def pg_tools() -> PgTools:
    """The PostgreSQL binaries, or a skip (a failure when CI=true)."""
    tools = _find_pg_tools()
    if isinstance(tools, str):
        unavailable(tools)
    return tools


class Cluster:
    """One PostgreSQL cluster on a free loopback port, its socket in its own folder."""

    def __init__(self, tools: PgTools, folder: Path) -> None:
        """Pick a port; nothing exists yet."""
        self.tools = tools
        self.dir = folder
        self.data = folder / "data"
        self.port = free_port()
        self.log = folder / "postgres.log"

    def _run(self, binary: str, *args: str, timeout: float = 60) -> str:
        return self.tools.run(binary, *args, cwd=self.dir, timeout=timeout)

    def initdb(self, *options: str) -> None:
        """Create the cluster (superuser `postgres`)."""
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            *options,
        )

    def base_backup_of(self, primary: Cluster) -> None:
        """Make this cluster a streaming replica of `primary` (standby.signal and
        primary_conninfo written by -R)."""
        self._run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.data),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )

    def configure(self, **settings: str) -> None:
        """Append settings to postgresql.conf (a later line wins)."""
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            for name, value in settings.items():
                conf.write(f"{name} = '{value}'\n")

    def write_hba(self, rules: str) -> None:
        """Replace pg_hba.conf."""
        (self.data / "pg_hba.conf").write_text(rules, encoding="utf-8")

    def start(self) -> None:
        """Start it, listening on 127.0.0.1 only, and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        try:
            self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t",
                "30", "start",
            )  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def stop(self) -> None:
        """Stop at once, as a crash would (no checkpoint, backends killed)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def promote(self) -> None:
        """End recovery and accept writes; returns once promoted."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "promote")

    def running(self) -> bool:
        """True while its postmaster runs."""
        return (self.data / "postmaster.pid").exists()

    def connect(self, dbname: str = "postgres") -> Any:
        """An autocommit superuser connection through the unix socket."""
        import psycopg2

        conn = psycopg2.connect(
            host=str(self.dir), port=self.port, user="postgres", dbname=dbname, connect_timeout=5
        )
        conn.autocommit = True
        return conn

    def sql(self, statement: str, params: tuple = (), dbname: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser; its rows."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params or None)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def log_tail(self, lines: int = 30) -> str:
        """The end of its log, for failure messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def remove(self) -> None:
        """Stop it if it runs and delete its files."""
        if self.running():
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Clusters:
    """Clusters made by one test, all removed at its end."""

    def __init__(self, tools: PgTools) -> None:
        """Nothing made yet."""
        self.tools = tools
        self.made: list[Cluster] = []

    def new(self, name: str) -> Cluster:
        """A cluster in a fresh folder; initdb is up to the caller."""
        cluster = Cluster(self.tools, self.tools.mkdtemp(f"cc-pg-{name}-"))
        self.made.append(cluster)
        return cluster

    def remove_all(self) -> None:
        """Stop and delete every cluster made."""
        for cluster in reversed(self.made):
            cluster.remove()
        self.made.clear()


@pytest.fixture
def clusters(pg_tools: PgTools) -> Iterator[Clusters]:
    """A factory of clusters for one test. Request it before make_server: fixtures end in
    the reverse order, so the servers stop before their databases."""
    made = Clusters(pg_tools)
    try:
        yield made
    finally:
        made.remove_all()


# -- 1. PostgreSQL over TLS -------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=str(cwd), capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed test CA: (certificate, key)."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=CloudChat {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return cert, key


def make_server_cert(folder: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A server certificate for localhost and 127.0.0.1 signed by `ca`: (certificate, key)."""
    cert, key, csr = folder / "server.crt", folder / "server.key", folder / "server.csr"
    ext = folder / "server.ext"
    ext.write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "extendedKeyUsage = serverAuth\n"
        "keyUsage = critical, digitalSignature\n",
        encoding="utf-8",
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
        cwd=folder,
    )  # fmt: skip
    return cert, key


@dataclass
class TlsPostgres:
    """A cluster that takes TLS connections only (scram password), and two CAs: the one
    that signed its certificate and an unrelated one."""

    cluster: Cluster
    password: str
    ca: Path
    wrong_ca: Path

    def url(self, ca: Path | None = None, host: str = "localhost", **query: str) -> str:
        """A DATABASE_URL with sslmode=verify-full and sslrootcert (the right CA unless
        told); extra query parameters appended."""
        params = {"sslmode": "verify-full", "sslrootcert": str(ca or self.ca), **query}
        tail = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://postgres:{self.password}@{host}:{self.cluster.port}/{DB_NAME}?{tail}"


@pytest.fixture(scope="module")
def tls_postgres(pg_tools: PgTools) -> Iterator[TlsPostgres]:
    """One TLS-only cluster for the module, with a `cloudchat` database (no schema yet)."""
    if not shutil.which("openssl"):
        unavailable("the openssl command is not installed (it makes the test CA)")
    root = pg_tools.mkdtemp("cc-pg-tls-")
    cluster = Cluster(pg_tools, root)
    try:
        pki = root / "pki"
        pki.mkdir()
        ca = make_ca(pki, "test-ca")
        wrong_ca = make_ca(pki, "other-ca")
        cert, key = make_server_cert(pki, ca)
        for path in (pki, cert, key):
            pg_tools.own(path)
        key.chmod(0o600)  # PostgreSQL refuses a key others can read
        password = f"pw-{os.urandom(6).hex()}"
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n", encoding="utf-8")
        pg_tools.own(pwfile)
        cluster.initdb("--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        cluster.configure(ssl="on", ssl_cert_file=str(cert), ssl_key_file=str(key))
        cluster.write_hba(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 127.0.0.1/32 reject\n"
        )
        cluster.start()
        cluster.sql(f'CREATE DATABASE "{DB_NAME}"')
        yield TlsPostgres(cluster, password, ca[0], wrong_ca[0])
    finally:
        cluster.remove()


def _ssl_of_own_backend(url: str) -> tuple[bool, str]:
    """(ssl, version) of the connection `url` opens, as pg_stat_ssl sees it."""
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            ssl, version = cur.fetchone()
            return ssl, version
    finally:
        conn.close()


def test_tls_with_the_right_ca(
    tls_postgres: TlsPostgres, make_server: ServerFactory, tmp_path: Path
) -> None:
    """verify-full with the CA that signed the server's certificate: initdb, a server
    (register, login, /auth/me), and every connection of the app is TLS."""
    import psycopg2

    url = tls_postgres.url()
    # The cluster takes nothing else: without TLS it refuses (so the checks below mean it).
    with pytest.raises(psycopg2.OperationalError, match=r"no encryption|reject"):
        psycopg2.connect(tls_postgres.url(sslmode="disable"), connect_timeout=5).close()
    for name in ("localhost", "127.0.0.1"):  # the certificate names both
        ssl, version = _ssl_of_own_backend(tls_postgres.url(host=name))
        assert ssl is True and version.startswith("TLSv1."), (name, ssl, version)

    env = {**base_env(), **HIGH_LIMITS, "DATABASE_URL": url, "DB_TIMEOUT": "3"}
    done = run_cli(["initdb"], env, tmp_path)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "schema applied to PostgreSQL" in done.stderr, done.stderr
    tables = tls_postgres.cluster.sql(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'users'",
        dbname=DB_NAME,
    )
    assert tables == [(1,)]

    server = make_server.start("embedded", {**HIGH_LIMITS, "DATABASE_URL": url})
    client, email, _ = register_and_login(server)
    me = client.me()
    assert me.status == 200 and me.json()["user"]["email"] == email, me
    assert server.client().get("/auth/healthz").json() == {"ok": True, "redis": True, "db": True}
    rows = tls_postgres.cluster.sql(
        "SELECT a.pid, s.ssl, host(a.client_addr) FROM pg_stat_activity a"
        " JOIN pg_stat_ssl s ON s.pid = a.pid"
        " WHERE a.datname = %s AND a.backend_type = 'client backend'",
        (DB_NAME,),
    )
    assert rows, "the server keeps no pooled connection to look at"
    assert all(ssl and addr == "127.0.0.1" for _, ssl, addr in rows), rows
    assert "Traceback" not in server.log_text()


# case -> what the one line must say. libpq's own messages run over several lines for some
# of these; the operator must still get one.
BAD_CERTIFICATES = {
    # An unrelated CA: the chain does not verify.
    "wrong-ca": "certificate verify failed",
    # The right CA, a name the certificate does not carry (hostaddr reaches the server).
    "wrong-host": "does not match host name",
    # A typo in sslrootcert.
    "missing-ca-file": "does not exist",
    # A failover DSN (item 4) whose first host is down and whose second has the wrong CA.
    "second-host-wrong-ca": "certificate verify failed",
}


def _bad_url(tls: TlsPostgres, case: str) -> str:
    """A DATABASE_URL for one of BAD_CERTIFICATES."""
    if case == "wrong-ca":
        return tls.url(tls.wrong_ca)
    if case == "wrong-host":
        return tls.url(host="db.invalid", hostaddr="127.0.0.1")
    if case == "missing-ca-file":
        return tls.url(Path("/nonexistent-cc/ca.pem"))
    assert case == "second-host-wrong-ca"
    return (
        f"host=localhost,localhost port={free_port()},{tls.cluster.port} dbname={DB_NAME}"
        f" user=postgres password={tls.password} sslmode=verify-full"
        f" sslrootcert={tls.wrong_ca}"
    )


@pytest.mark.parametrize("case", list(BAD_CERTIFICATES))
def test_initdb_refuses_a_certificate_it_cannot_verify(
    tls_postgres: TlsPostgres, tmp_path: Path, case: str
) -> None:
    """initdb exits non-zero with one stderr line naming the certificate problem: no
    traceback, no password."""
    expected = BAD_CERTIFICATES[case]
    env = {**base_env(), "DATABASE_URL": _bad_url(tls_postgres, case), "DB_TIMEOUT": "3"}
    done = run_cli(["initdb"], env, tmp_path)
    assert done.returncode != 0, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cloudchat: initdb failed: database:"), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert tls_postgres.password not in done.stderr + done.stdout


def test_server_with_the_wrong_ca_answers_503(
    tls_postgres: TlsPostgres, make_server: ServerFactory
) -> None:
    """A server whose database certificate does not verify starts, says so, and answers
    503 (healthz db false, a login 503), never a traceback."""
    url = tls_postgres.url(tls_postgres.wrong_ca)
    server = make_server.start("embedded", {**HIGH_LIMITS, "DATABASE_URL": url, "DB_TIMEOUT": "2"})
    health = server.client().get("/auth/healthz")
    assert health.status == 503, health
    assert health.json() == {"ok": False, "redis": True, "db": False}
    assert_error(server.client().login(random_email(), strong_password()), 503, "unavailable")
    assert_error(server.client().register(random_email(), strong_password()), 503, "unavailable")
    wait_until(
        lambda: "certificate verify failed" in server.log_text(), 5, what="the cause in the log"
    )
    log = server.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert tls_postgres.password not in log


# -- 2. The production guard against plain TCP to another machine -----------------------------

# Production settings that pass the guard (as tests/test_cli.py's): stores on loopback.
PRODUCTION = {
    "CLOUDCHAT_ENV": "production",
    "HOST": "127.0.0.1",
    "COOKIE_SECURE": "1",
    "FRONTEND_BASE_URL": "https://chat.example.com",
    "DATABASE_URL": "postgresql://cc@127.0.0.1:5432/cloudchat",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "DEEPSEEK_API_KEY": "sk-test-unused",
    "SECRET_KEY": TEST_SECRET_KEY,
    "SMTP_HOST": "127.0.0.1",
}
OVERRIDE = "ALLOW_PLAINTEXT_STORES=1"

# case -> (changed settings, None if the guard accepts them, else what its one complaint
# must contain).
GUARD_CASES: dict[str, tuple[dict[str, str | None], tuple[str, ...] | None]] = {
    "pg-remote-url-no-sslmode": (
        {"DATABASE_URL": "postgresql://cc:pw-in-url@db.example.com:5432/cloudchat"},
        ("DATABASE_URL", "db.example.com", "sslmode=verify-full", OVERRIDE),
    ),
    "pg-remote-sslmode-prefer": (
        {"DATABASE_URL": "postgresql://cc@db.example.com/cloudchat?sslmode=prefer"},
        ("DATABASE_URL", "db.example.com"),
    ),
    "pg-remote-sslmode-disable": (
        {"DATABASE_URL": "host=db.example.com dbname=cloudchat sslmode=disable"},
        ("DATABASE_URL", "db.example.com"),
    ),
    "pg-remote-sslmode-require": (
        {"DATABASE_URL": "postgresql://cc@db.example.com/cloudchat?sslmode=require"},
        None,
    ),
    "pg-remote-sslmode-verify-ca": (
        {"DATABASE_URL": "postgresql://cc@db.example.com/cloudchat?sslmode=verify-ca"},
        None,
    ),
    "pg-remote-sslmode-verify-full": (
        {
            "DATABASE_URL": "postgresql://cc@db.example.com/cloudchat"
            "?sslmode=verify-full&sslrootcert=/etc/cloudchat/pg-ca.pem"
        },
        None,
    ),
    "pg-multi-host-dsn-no-sslmode": (
        {
            "DATABASE_URL": "host=10.0.0.5,10.0.0.6 port=5432,5432 dbname=cloudchat user=cc"
            " target_session_attrs=read-write"
        },
        ("DATABASE_URL", "10.0.0.5, 10.0.0.6", OVERRIDE),
    ),
    "pg-multi-host-dsn-one-remote": (
        {"DATABASE_URL": "host=127.0.0.1,10.0.0.6 port=5432,5432 dbname=cloudchat"},
        ("DATABASE_URL", "10.0.0.6"),
    ),
    "pg-multi-host-url-no-sslmode": (
        {
            "DATABASE_URL": "postgresql://cc@db1.internal:5432,db2.internal:5432/cloudchat"
            "?target_session_attrs=read-write"
        },
        ("DATABASE_URL", "db1.internal, db2.internal"),
    ),
    "pg-multi-host-dsn-sslmode-require": (
        {
            "DATABASE_URL": "host=10.0.0.5,10.0.0.6 port=5432,5432 dbname=cloudchat user=cc"
            " target_session_attrs=read-write sslmode=require"
        },
        None,
    ),
    "pg-multi-host-dsn-override": (
        {
            "DATABASE_URL": "host=10.0.0.5,10.0.0.6 port=5432,5432 dbname=cloudchat user=cc",
            "ALLOW_PLAINTEXT_STORES": "1",
        },
        None,
    ),
    # libpq connects to hostaddr (host then only names the certificate): 10.0.0.5 here.
    "pg-remote-hostaddr-no-sslmode": (
        {"DATABASE_URL": "hostaddr=10.0.0.5 dbname=cloudchat user=cc"},
        ("DATABASE_URL", "10.0.0.5"),
    ),
    "pg-localhost": ({"DATABASE_URL": "postgresql://cc@localhost/cloudchat"}, None),
    "pg-loopback-127-0-0-2": ({"DATABASE_URL": "host=127.0.0.2 dbname=cloudchat"}, None),
    "pg-loopback-ipv6": ({"DATABASE_URL": "postgresql://cc@[::1]:5432/cloudchat"}, None),
    "pg-loopback-multi-host": (
        {"DATABASE_URL": "host=127.0.0.1,127.0.0.1 port=5432,5433 dbname=cloudchat"},
        None,
    ),
    "pg-unix-socket-dsn": (
        {"DATABASE_URL": "host=/var/run/postgresql dbname=cloudchat user=cc"},
        None,
    ),
    "pg-unix-socket-url": (
        {"DATABASE_URL": "postgresql:///cloudchat?host=/var/run/postgresql"},
        None,
    ),
    "pg-unix-socket-url-encoded": (
        {"DATABASE_URL": "postgresql://%2Fvar%2Frun%2Fpostgresql/cloudchat"},
        None,
    ),
    "redis-remote-plain": (
        {"REDIS_URL": "redis://:pw-in-url@cache.internal:6379/0"},
        ("Redis at cache.internal", "rediss://", OVERRIDE),
    ),
    "redis-remote-tls": ({"REDIS_URL": "rediss://:pw@cache.internal:6380/0"}, None),
    "redis-remote-plain-override": (
        {"REDIS_URL": "redis://cache.internal:6379/0", "ALLOW_PLAINTEXT_STORES": "1"},
        None,
    ),
    "redis-localhost": ({"REDIS_URL": "redis://localhost:6379/0"}, None),
    "redis-unix-socket": ({"REDIS_URL": "unix:///run/redis/redis.sock?db=0"}, None),
    "sentinels-remote-no-url": (
        {"REDIS_URL": None, "REDIS_SENTINELS": "10.0.0.7:26379,10.0.0.8:26379,10.0.0.9"},
        ("Redis at 10.0.0.7, 10.0.0.8, 10.0.0.9", "rediss://"),
    ),
    "sentinels-remote-plain-url": (
        {"REDIS_URL": "redis://:pw@/0", "REDIS_SENTINELS": "10.0.0.7:26379,10.0.0.8:26379"},
        ("Redis at 10.0.0.7, 10.0.0.8",),
    ),
    "sentinels-remote-rediss-url": (
        {"REDIS_URL": "rediss://:pw@/0", "REDIS_SENTINELS": "10.0.0.7:26379,10.0.0.8:26379"},
        None,
    ),
    "sentinels-loopback": (
        {"REDIS_URL": None, "REDIS_SENTINELS": "127.0.0.1:26379,127.0.0.1:26380"},
        None,
    ),
}


def _examine(changes: Mapping[str, str | None]) -> tuple[list[str], list[str]]:
    """(setting problems, production problems) of PRODUCTION with some settings changed."""
    env: dict[str, str] = dict(PRODUCTION)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    _, problems, unsafe = cloudchat.Config.examine_env(env)
    return problems, unsafe


def test_the_production_settings_pass_the_guard() -> None:
    """The base of the cases below has no problem at all."""
    assert _examine({}) == ([], [])


@pytest.mark.parametrize("case", list(GUARD_CASES))
def test_plaintext_store_guard(case: str) -> None:
    """A store on another machine without TLS is one production problem naming the
    variable, the host and the fix; TLS, loopback, a unix socket or the override are none."""
    changes, complaint = GUARD_CASES[case]
    problems, unsafe = _examine(changes)
    assert problems == []
    if complaint is None:
        assert unsafe == [], unsafe
        return
    assert len(unsafe) == 1, unsafe
    for text in complaint:
        assert text in unsafe[0], (text, unsafe[0])
    assert "pw-in-url" not in unsafe[0]


def test_development_does_not_guard_the_stores() -> None:
    """Outside production a plain connection to another machine is the developer's call."""
    problems, unsafe = _examine(
        {
            "CLOUDCHAT_ENV": "development",
            "DATABASE_URL": "postgresql://cc@db.example.com/cloudchat",
            "REDIS_URL": "redis://cache.internal:6379/0",
        }
    )
    assert (problems, unsafe) == ([], [])


def test_redis_ca_file_needs_rediss(tmp_path: Path) -> None:
    """REDIS_CA_FILE with a redis:// URL is a setting problem (in any environment); with
    rediss:// it is fine."""
    ca = tmp_path / "redis-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    for env in ("development", "production"):
        problems, _ = _examine(
            {
                "CLOUDCHAT_ENV": env,
                "REDIS_URL": "redis://127.0.0.1:6379/0",
                "REDIS_CA_FILE": str(ca),
            }
        )
        assert len(problems) == 1 and "REDIS_CA_FILE" in problems[0], problems
        assert "rediss://" in problems[0], problems
    problems, unsafe = _examine(
        {"REDIS_URL": "rediss://cache.internal:6380/0", "REDIS_CA_FILE": str(ca)}
    )
    assert (problems, unsafe) == ([], [])


def _production_process_env(tmp_path: Path, **changes: str) -> dict[str, str]:
    """A process environment: PRODUCTION (real Argon2 costs) plus changes."""
    env = base_env()
    for name in CHEAP_ARGON2:
        env.pop(name)
    env.update(PRODUCTION)
    env["CLOUDCHAT_DB_PATH"] = str(tmp_path / "unused.db")
    env.update(changes)
    return env


def test_production_start_refuses_plaintext_database(tmp_path: Path) -> None:
    """A real start in production: exit 2 and one stderr line naming DATABASE_URL and the
    fix, the password kept out."""
    env = _production_process_env(
        tmp_path,
        DATABASE_URL="postgresql://cc:pw-in-url@db.example.com:5432/cloudchat",
        REDIS_URL="redis://cache.internal:6379/0",
    )
    try:
        done = run_cli([], env, tmp_path, timeout=20)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"cloudchat started instead of refusing: {exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith("cloudchat: refusing to start:"), line
    for text in ("DATABASE_URL", "db.example.com", "sslmode=verify-full", OVERRIDE):
        assert text in line, (text, line)
    assert "Redis at cache.internal" in line, line
    assert "pw-in-url" not in done.stderr + done.stdout


def test_check_config_names_the_plaintext_store_and_accepts_the_override(
    tmp_path: Path,
) -> None:
    """`check-config` in production: the plain multi-host DSN is an unsafe line (exit 2);
    with ALLOW_PLAINTEXT_STORES=1 the configuration is ok (exit 0)."""
    dsn = "host=10.0.0.5,10.0.0.6 port=5432,5432 dbname=cloudchat user=cc password=pw-in-dsn"
    env = _production_process_env(tmp_path, DATABASE_URL=dsn)
    done = run_cli(["check-config"], env, tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    unsafe = [line for line in done.stdout.splitlines() if line.startswith("unsafe in production")]
    assert len(unsafe) == 1 and "DATABASE_URL reaches 10.0.0.5, 10.0.0.6" in unsafe[0], unsafe
    assert "pw-in-dsn" not in done.stdout + done.stderr

    done = run_cli(["check-config"], {**env, "ALLOW_PLAINTEXT_STORES": "1"}, tmp_path)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "configuration ok" in done.stdout
    assert "pw-in-dsn" not in done.stdout + done.stderr


# -- 4. PostgreSQL failover ---------------------------------------------------------------------

# Commits wait until the replica has the WAL on disk (synchronous_commit=on with a
# synchronous standby): without it a commit acknowledged in the last milliseconds before
# the crash may never reach the replica, and the test could not claim "nothing is lost".
# (Asynchronous on loopback lost nothing in six runs, but nothing promises that.)
SYNCHRONOUS_STANDBY = True
WORKERS = 4  # client threads
PACE = 0.01  # seconds between one worker's rounds
OUTAGE = 1.0  # seconds between the primary's crash and the promotion
HANG_LIMIT = 5.0  # no answer may take longer (DB_TIMEOUT is 2 s)
LOOP_BUDGET = 40.0  # the client loop ends by then whatever happens
ALLOWED = {
    "register": {201, 503},
    "login": {200, 503},
    "me": {200, 503},  # the new account's session
    "me-old": {200, 503},  # a session made before the failover: never a 401
}
WRITES = {"register": 201, "login": 200}


@dataclass
class Attempt:
    """One request of the client loop."""

    kind: str
    started: float
    ended: float
    status: int  # 0: no HTTP answer (refused, reset, timed out)
    email: str
    detail: str

    @property
    def duration(self) -> float:
        """Seconds until the answer (or the error)."""
        return self.ended - self.started

    @property
    def wrote(self) -> bool:
        """A write that succeeded."""
        return WRITES.get(self.kind) == self.status


@dataclass
class ClientLoop:
    """Worker threads that register, log in and read (/auth/me) until told to stop."""

    server: Server
    readers: list[Client]
    attempts: list[Attempt] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        """Start one worker per reader."""
        deadline = time.monotonic() + LOOP_BUDGET
        for reader in self.readers:
            thread = threading.Thread(target=self._work, args=(reader, deadline), daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        """Tell the workers to stop and wait for them."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self.threads), "a worker hangs"

    def _call(
        self, kind: str, email: str, send: Callable[..., Response], *args: str
    ) -> Response | None:
        started = time.monotonic()
        response: Response | None = None
        try:
            response = send(*args)
            status, detail = response.status, response.body[:200].decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            status, detail = 0, repr(exc)
        self.attempts.append(Attempt(kind, started, time.monotonic(), status, email, detail))
        return response

    def _work(self, reader: Client, deadline: float) -> None:
        while not self.stopping.is_set() and time.monotonic() < deadline:
            client = self.server.client()
            email, password = random_email(), strong_password()
            self.passwords[email] = password
            registered = self._call("register", email, client.register, email, password)
            if registered is not None and registered.status == 201:
                login = self._call("login", email, client.login, email, password)
                if login is not None and login.status == 200:
                    self._call("me", email, client.me)
            self._call("me-old", "", reader.me)
            self.stopping.wait(PACE)

    def count(self, since: float, kind: str | None = None, status: int | None = None) -> int:
        """Requests started at `since` or later, of a kind and status if given."""
        return sum(
            1
            for a in list(self.attempts)
            if a.started >= since
            and (kind is None or a.kind == kind)
            and (status is None or a.status == status)
        )


def _wait_streaming(primary: Cluster, synchronous: bool) -> None:
    """Until the primary sees its replica streaming (and as its synchronous standby)."""
    wanted = "sync" if synchronous else "async"
    wait_until(
        lambda: primary.sql(
            "SELECT 1 FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = %s",
            (wanted,),
        ),
        20,
        what=f"the replica streaming ({wanted})",
    )


@pytest.mark.slow
def test_postgres_failover(clusters: Clusters, make_server: ServerFactory, tmp_path: Path) -> None:
    """A primary and its streaming replica behind one multi-host DATABASE_URL with
    target_session_attrs=read-write. While clients register, log in and read, the primary
    crashes and the replica is promoted: only 503s meanwhile (quick ones), writes resume,
    and every account whose registration was answered 201 can still log in."""
    primary, replica = clusters.new("primary"), clusters.new("replica")
    primary.initdb("-A", "trust")  # the default pg_hba.conf lets 127.0.0.1 replicate
    primary.start()
    primary.sql(f'CREATE DATABASE "{DB_NAME}"')
    dsn = (
        f"host=127.0.0.1,127.0.0.1 port={primary.port},{replica.port} dbname={DB_NAME}"
        " user=postgres target_session_attrs=read-write connect_timeout=2"
    )
    env = {**HIGH_LIMITS, "DATABASE_URL": dsn, "DB_TIMEOUT": "2"}
    # The replica is not running yet: libpq skips the refused second host.
    done = run_cli(["initdb"], {**base_env(), **env}, tmp_path)
    assert done.returncode == 0, (done.stdout, done.stderr)

    replica.base_backup_of(primary)
    replica.start()
    assert replica.sql("SELECT pg_is_in_recovery()") == [(True,)]
    if SYNCHRONOUS_STANDBY:
        # On the primary only, after the base backup: the promoted replica must not wait
        # for a standby of its own.
        primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        primary.sql("SELECT pg_reload_conf()")
    _wait_streaming(primary, SYNCHRONOUS_STANDBY)

    server = make_server.start("embedded", env)
    readers = [register_and_login(server)[0] for _ in range(WORKERS)]
    loop = ClientLoop(server, readers)
    began = time.monotonic()
    loop.start()
    try:
        wait_until(lambda: loop.count(began, "register", 201) >= 50, 20, what="50 registrations")
        stop_began = time.monotonic()
        primary.stop()
        stopped = time.monotonic()
        # A failover manager takes a moment to decide: the clients see the primary gone
        # for OUTAGE seconds (each worker answered 503s) before the replica is promoted.
        wait_until(
            lambda: loop.count(stopped + OUTAGE, status=503) >= WORKERS,
            15,
            what=f"{OUTAGE} s of 503s with the primary down",
        )
        promote_began = time.monotonic()
        replica.promote()
        promoted = time.monotonic()
        wait_until(
            lambda: loop.count(promote_began, "register", 201) >= 50,
            20,
            what="50 registrations after the promotion",
        )
    finally:
        loop.stop()
    ended = time.monotonic()
    attempts = list(loop.attempts)

    # Every answer a client may see: the expected ones, and 503s; no 500, 401 or silence.
    wrong = [
        a
        for a in attempts
        if a.status not in ALLOWED[a.kind] or (a.status == 503 and '"unavailable"' not in a.detail)
    ]
    slow = [a for a in attempts if a.duration > HANG_LIMIT]
    failed = [a for a in attempts if a.status == 503]
    first_503 = min((a.ended for a in failed), default=None)
    resumed = min(
        (a.ended for a in attempts if a.wrote and first_503 and a.started >= first_503),
        default=None,
    )
    first_promoted_write = min(
        (a.ended for a in attempts if a.wrote and a.started >= promote_began), default=None
    )
    accounts = [a for a in attempts if a.kind == "register" and a.status == 201]
    before_stop = [a for a in accounts if a.ended <= stop_began]

    # Nothing acknowledged is lost: in the new primary's table, and able to log in.
    emails = [a.email for a in accounts]
    found = {
        email
        for (email,) in replica.sql(
            "SELECT email FROM users WHERE email = ANY(%s::text[])", (emails,), dbname=DB_NAME
        )
    }
    lost = [email for email in emails if email not in found]
    unanswered = [a.email for a in attempts if a.kind == "register" and a.status != 201]
    kept_anyway = replica.sql(
        "SELECT count(*) FROM users WHERE email = ANY(%s::text[])", (unanswered,), dbname=DB_NAME
    )[0][0]
    cannot_log_in = [
        email
        for email in emails
        if server.client().login(email, loop.passwords[email]).status != 200
    ]
    health = server.client().get("/auth/healthz")

    report = {
        "replication": "synchronous" if SYNCHRONOUS_STANDBY else "asynchronous",
        "requests": len(attempts),
        "503": len(failed),
        "503 by kind": {k: sum(1 for a in failed if a.kind == k) for k in ALLOWED},
        "other failures": len(wrong),
        "slowest answer s": round(max(a.duration for a in attempts), 3),
        "registrations 201": len(accounts),
        "201 before the stop": len(before_stop),
        "lost rows": len(lost),
        "503 registrations committed anyway": kept_anyway,
        "pg_ctl stop s": round(stopped - stop_began, 3),
        "pg_ctl promote s": round(promoted - promote_began, 3),
        "first 503 -> first write s": round(resumed - first_503, 3)
        if resumed and first_503
        else None,
        "promote began -> first write s": round(first_promoted_write - promote_began, 3)
        if first_promoted_write
        else None,
        "stop -> first 503 s": round(first_503 - stop_began, 3) if first_503 else None,
        "loop s": round(ended - began, 1),
    }
    print(f"\nPostgreSQL failover: {report}")

    log = server.log_text()
    assert not wrong, (report, wrong[:10], log[-3000:])
    assert not slow, (report, slow[:10])
    assert first_503 is not None and resumed is not None, report
    assert not lost, (report, lost)
    assert not cannot_log_in, (report, cannot_log_in)
    assert health.status == 200, health
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_failover_past_a_hung_first_host(
    clusters: Clusters, make_server: ServerFactory, tmp_path: Path
) -> None:
    """The old primary's address still accepts TCP but never answers (a hung machine, a
    stalled proxy in front of it): libpq gives each host connect_timeout and moves on to
    the next, so CloudChat must reach the promoted server behind it, within about
    DB_TIMEOUT per new connection, and so must initdb."""
    import psycopg2

    promoted = clusters.new("promoted")
    promoted.initdb("-A", "trust")
    promoted.start()
    promoted.sql(f'CREATE DATABASE "{DB_NAME}"')
    alone = f"host=127.0.0.1 port={promoted.port} dbname={DB_NAME} user=postgres"
    done = run_cli(["initdb"], {**base_env(), "DATABASE_URL": alone}, tmp_path)
    assert done.returncode == 0, (done.stdout, done.stderr)

    hung = SilentTcpServer()
    try:
        dsn = (
            f"host=127.0.0.1,127.0.0.1 port={hung.port},{promoted.port} dbname={DB_NAME}"
            " user=postgres target_session_attrs=read-write connect_timeout=2"
        )
        # libpq on its own (a blocking connection, as psql makes) gets past the hung host.
        conn = psycopg2.connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT inet_server_port()")
                assert cur.fetchone() == (promoted.port,)
        finally:
            conn.close()

        env = {**HIGH_LIMITS, "DATABASE_URL": dsn, "DB_TIMEOUT": "2"}
        server = make_server.start("embedded", env)
        answers: list[Response] = []
        deadline = time.monotonic() + 12  # several connection attempts' worth
        while time.monotonic() < deadline:
            answers.append(server.client().register(random_email(), strong_password()))
            if answers[-1].status == 201:
                break
        after = [
            server.client().register(random_email(), strong_password())
            for _ in range(3 if answers[-1].status == 201 else 0)
        ]
        initdb_done = run_cli(["initdb"], {**base_env(), **env}, tmp_path)
    finally:
        hung.close()
    log = server.log_text()
    assert all(a.elapsed < HANG_LIMIT for a in answers + after), answers + after
    assert answers[-1].status == 201, (
        [(a.status, round(a.elapsed, 2)) for a in answers],
        log[-1500:],
    )
    assert [a.status for a in after] == [201] * 3, after  # the pool keeps the good host
    assert initdb_done.returncode == 0, initdb_done.stderr
    assert "Traceback" not in log
