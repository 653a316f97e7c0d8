"""Issue 20: Redis beyond one box, against real redis-server and redis-sentinel processes.

- Redis over TLS (rediss://) with a private CA made here with the openssl CLI: the right CA
  connects, another CA or a certificate for another name does not, and CloudChat answers
  quick 503s then (no hang, no 500, no traceback).
- The ACL user of deploy/redis/cloudchat.acl: every Redis-using feature runs with only the
  commands listed there, on its own key prefix, and Redis's ACL LOG stays empty.
- Redis Sentinel: a burst of requests waits for a pooled connection as with REDIS_URL; and
  (slow) a primary, a replica and three sentinels: the primary is killed while a client
  reads /auth/me and chats; CloudChat follows the promoted replica.

Every process runs on loopback on a free port in a directory of its own, and is stopped by
its PID when its fixture ends (CloudChat first: `fleet` comes before `make_server`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ServerFactory, unavailable
from tests.helpers import (
    ALL_LIMITS_RAISED,
    HIGH_LIMITS,
    ROOT,
    Client,
    Response,
    Server,
    free_port,
    make_ca,
    make_server_cert,
    random_email,
    random_hex,
    register_and_login,
    run_cli,
    strong_password,
    wait_until,
)

ACL_FILE = ROOT / "deploy" / "redis" / "cloudchat.acl"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# A store that fails answers a 503 within REDIS_TIMEOUT (1 s by default), twice that at most
# while waiting for a pooled connection: anything slower is a hang.
QUICK = 3.0


def need(binary: str, package: str) -> str:
    """The path of an installed program, or skip (CI: fail) naming the package to install."""
    path = shutil.which(binary)
    if path is None:
        unavailable(f"{binary} is not installed (apt-get install {package})")
    return path


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- processes ---------------------------------------------------------------------------------


class RedisProcess:
    """One redis-server or redis-sentinel of this test's own: loopback, a free port, its own
    directory, no persistence; stopped (or killed) by its PID."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        command: list[str],
        port: int,
        connect: dict[str, Any] | None = None,
    ) -> None:
        """Start it (`wait_ready` waits for its PING); `connect`: redis-py options to reach
        it, e.g. TLS."""
        self.name = name
        self.workdir = workdir
        self.port = port
        self.connect = {"host": "127.0.0.1", "port": port, **(connect or {})}
        self.log_path = workdir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                command,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.proc.pid

    def wait_ready(self) -> RedisProcess:
        """Wait until it answers PING; fail with its log if it exits first."""
        wait_until(self.answers, START_TIMEOUT, what=f"{self.name} to answer PING")
        return self

    def answers(self) -> bool:
        """True once it answers PING; AssertionError (with its log) if it has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
            )
        try:
            with contextlib.closing(self.client(socket_timeout=1)) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self, **options: Any) -> redis.Redis:
        """A new redis-py client of this process (the default user, no password)."""
        return redis.Redis(
            **{"socket_timeout": 3, "socket_connect_timeout": 3, **self.connect, **options}
        )

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a deadline; reaped either way."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)


class Fleet:
    """The Redis processes one fixture started, stopped together (newest first) at its end."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        self.processes: list[RedisProcess] = []

    def redis(
        self,
        name: str,
        *args: str,
        port: int = 0,
        connect: dict[str, Any] | None = None,
        config: str = "",
    ) -> RedisProcess:
        """A redis-server on `port` (a free one if 0): `config` (redis.conf text) read first
        if given, then the defaults, then `args` (which may turn the plain port off)."""
        binary = need("redis-server", "redis-server")
        workdir = self.tmp.mktemp(name)
        port = port or free_port()
        command = [binary]
        if config:
            (workdir / "redis.conf").write_text(config, encoding="utf-8")
            command.append(str(workdir / "redis.conf"))
        command += [
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            *args,
        ]
        process = RedisProcess(name, workdir, command, port, connect)
        self.processes.append(process)
        return process.wait_ready()

    def sentinel(self, name: str, primary_port: int, quorum: int) -> RedisProcess:
        """A redis-sentinel watching the primary at 127.0.0.1:primary_port as `mymaster`."""
        binary = need("redis-sentinel", "redis-sentinel")
        workdir = self.tmp.mktemp(name)
        port = free_port()
        config = workdir / "sentinel.conf"  # the sentinel rewrites it: its own, writable
        config.write_text(
            "\n".join(
                (
                    f"port {port}",
                    "bind 127.0.0.1",
                    f"dir {workdir}",
                    "daemonize no",
                    'logfile ""',
                    f"sentinel monitor mymaster 127.0.0.1 {primary_port} {quorum}",
                    "sentinel down-after-milliseconds mymaster 1000",
                    "sentinel failover-timeout mymaster 5000",
                    "sentinel parallel-syncs mymaster 1",
                    "",
                )
            ),
            encoding="utf-8",
        )
        process = RedisProcess(name, workdir, [binary, str(config)], port)
        self.processes.append(process)
        return process.wait_ready()

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()


@contextlib.contextmanager
def fleet_of(tmp: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp)
    try:
        yield fleet
    finally:
        fleet.stop_all()


@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Redis processes for one test, stopped by PID at its end."""
    with fleet_of(tmp_path_factory) as started:
        yield started


# -- a private CA ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A test CA and certificates it signed, and a second CA that signed nothing here."""

    ca: Path
    other_ca: Path
    cert: Path  # DNS:localhost and IP:127.0.0.1
    key: Path
    name_only_cert: Path  # DNS:localhost only
    name_only_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    need("openssl", "openssl")
    workdir = tmp_path_factory.mktemp("pki")
    ca = make_ca(workdir, "ca")
    other_ca = make_ca(workdir, "other-ca")
    cert, key = make_server_cert(workdir, "ca", "redis", "DNS:localhost,IP:127.0.0.1")
    name_cert, name_key = make_server_cert(workdir, "ca", "redis-name-only", "DNS:localhost")
    return Pki(ca, other_ca, cert, key, name_cert, name_key)


def tls_redis(fleet: Fleet, pki: Pki, name: str, cert: Path, key: Path) -> RedisProcess:
    """A redis-server that speaks TLS only (no plain port), clients unauthenticated by
    certificate; skip (CI: fail) if this redis-server was built without TLS."""
    port = free_port()
    try:
        return fleet.redis(
            name,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(pki.ca),
            "--tls-auth-clients",
            "no",
            port=port,
            connect={"host": "localhost", "ssl": True, "ssl_ca_certs": str(pki.ca)},
        )
    except AssertionError as exc:
        if "tls" in str(exc).lower() and ("directive" in str(exc) or "support" in str(exc)):
            unavailable(f"redis-server was built without TLS: {one_line(str(exc))[-300:]}")
        raise


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[RedisProcess]:
    """A TLS-only redis-server whose certificate names localhost and 127.0.0.1."""
    with fleet_of(tmp_path_factory) as started:
        yield tls_redis(started, pki, "redis-tls", pki.cert, pki.key)


# -- checks on a server's log ------------------------------------------------------------------


def assert_no_crash(server: Server) -> None:
    """No traceback and no 500 in the server's log."""
    text = server.log_text()
    assert "Traceback" not in text, text[-4000:]
    assert not [line for line in server.logs if " 500 " in line], text[-4000:]


def statuses(server: Server) -> list[str]:
    """The access lines' "METHOD /path STATUS" parts, in order."""
    found = []
    for line in server.logs:
        for method in ("GET ", "POST ", "PATCH ", "DELETE "):
            at = line.find(method)
            if at >= 0:
                found.append(" ".join(line[at:].split()[:3]))
                break
    return found


# -- 1. TLS ------------------------------------------------------------------------------------


def tls_env(url: str, ca: Path) -> dict[str, str | None]:
    return {
        **HIGH_LIMITS,
        "REDIS_URL": url,
        "REDIS_CA_FILE": str(ca),
        "REDIS_KEY_PREFIX": f"cc-tls-{random_hex(4)}:",
    }


def test_tls_with_the_private_ca(make_server: ServerFactory, tls: RedisProcess, pki: Pki) -> None:
    """rediss:// with REDIS_CA_FILE: sign-in, /auth/me (cached in Redis) and healthz work, and
    the keys are in the TLS-only Redis."""
    server = make_server.start("embedded", tls_env(f"rediss://localhost:{tls.port}/0", pki.ca))
    client, _, _ = register_and_login(server)
    for _ in range(3):
        me = client.me()
        assert me.status == 200, me
    health = server.client().get("/auth/healthz")
    assert health.status == 200, health
    assert health.json() == {"ok": True, "redis": True, "db": True}
    prefix = server.env["REDIS_KEY_PREFIX"]
    with contextlib.closing(tls.client()) as admin:
        keys = {key.decode() for key in admin.scan_iter(match=f"{prefix}*")}
    assert any(key.startswith(f"{prefix}sess:") for key in keys), keys
    assert any(key.startswith(f"{prefix}rl:") for key in keys), keys
    assert_no_crash(server)


def assert_quick_503s(server: Server, cause: str) -> None:
    """healthz says redis false; sign-in and registration answer 503 quickly; the log names
    `cause` on one line, with no traceback and no 500."""
    health = server.client().get("/auth/healthz")
    assert health.status == 503, health
    assert health.json() == {"ok": False, "redis": False, "db": True}
    assert health.elapsed < QUICK, health.elapsed
    email, password = random_email(), strong_password()
    for answer in (
        server.client().register(email, password),
        server.client().login(email, password),
        server.client().post("/auth/password/forgot", {"identifier": email}),
    ):
        assert answer.status == 503, answer
        assert answer.json()["code"] == "unavailable", answer
        assert answer.elapsed < QUICK, (answer.elapsed, answer)
    wait_until(
        lambda: any("POST /auth/password/forgot 503" in line for line in server.logs),
        5,
        what="the forgot 503's access line",
    )
    named = [line for line in server.logs if cause.lower() in line.lower()]
    assert named, server.log_text()[-4000:]
    assert_no_crash(server)


def test_tls_with_another_ca_fails_quickly(
    make_server: ServerFactory, tls: RedisProcess, pki: Pki
) -> None:
    """REDIS_CA_FILE of a CA that did not sign the server's certificate: no connection, and
    quick 503s that name the certificate problem."""
    server = make_server.start(
        "embedded", tls_env(f"rediss://localhost:{tls.port}/0", pki.other_ca)
    )
    assert_quick_503s(server, "certificate verify failed")


def test_tls_checks_the_host_name(fleet: Fleet, make_server: ServerFactory, pki: Pki) -> None:
    """A certificate for DNS:localhost only, reached as 127.0.0.1 with the right CA: refused
    (the name is checked, not only the CA); reached as localhost it is fine."""
    named = tls_redis(fleet, pki, "redis-tls-name", pki.name_only_cert, pki.name_only_key)
    with contextlib.closing(named.client()) as by_name:
        assert by_name.ping()  # same server, same CA: only the name differs below
    server = make_server.start("embedded", tls_env(f"rediss://127.0.0.1:{named.port}/0", pki.ca))
    assert_quick_503s(server, "IP address mismatch")


# -- 2. the ACL user ---------------------------------------------------------------------------

ACL_PREFIX = "cc-acl:"
ACL_PASSWORD = "acl-" + "pw" * 16


def acl_user_line(prefix: str, password: str) -> str:
    """The `user` line of deploy/redis/cloudchat.acl, with its key pattern and password."""
    text = ACL_FILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("user cloudchat "), lines
    line = lines[0]
    assert " ~cc:* " in line and " >CHANGE_ME " in line, line
    return line.replace(" ~cc:* ", f" ~{prefix}* ").replace(" >CHANGE_ME ", f" >{password} ")


def acl_commands() -> list[str]:
    """The commands the ACL line grants, as listed there (+name)."""
    return [word[1:] for word in acl_user_line("x:", "pw").split() if word.startswith("+")]


def test_acl_file_is_a_redis_conf_fragment() -> None:
    """One `user` line, on by default: everything revoked first, then only single commands
    granted (no category, no key but the prefix, no channel)."""
    words = acl_user_line("cc:", "pw").split()
    assert words[:3] == ["user", "cloudchat", "on"], words
    assert "-@all" in words and "resetkeys" in words and "resetchannels" in words, words
    assert [w for w in words if w.startswith("~")] == ["~cc:*"], words
    assert not [w for w in words if w.startswith(("+@", "&", "allkeys", "allcommands"))], words
    assert words.index("-@all") < min(words.index(f"+{c}") for c in acl_commands()), words


def me_patch(client: Client, body: dict[str, Any]) -> Response:
    return client.request("PATCH", "/auth/me", json_body=body)


def chat(client: Client, message: str) -> Response:
    return client.post("/deepseek_chat", {"message": message})


def test_acl_user_runs_every_feature(fleet: Fleet, make_server: ServerFactory) -> None:
    """A Redis with only the ACL user of deploy/redis/cloudchat.acl (keys: the prefix) runs
    every Redis-using feature; ACL LOG stays empty, nothing answers 500 or 503."""
    line = acl_user_line(ACL_PREFIX, ACL_PASSWORD)
    store = fleet.redis("redis-acl", config=f"# deploy/redis/cloudchat.acl, filled in\n{line}\n")
    with contextlib.closing(store.client(db=1)) as admin:
        assert admin.acl_getuser("cloudchat")["enabled"]
        admin.acl_log_reset()
        server = make_server.start(
            "embedded",
            {
                **ALL_LIMITS_RAISED,
                # Database 1: SELECT is part of what the user needs then.
                "REDIS_URL": f"redis://cloudchat:{ACL_PASSWORD}@127.0.0.1:{store.port}/1",
                "REDIS_KEY_PREFIX": ACL_PREFIX,
                "RATE_LOGIN_IDENTIFIER": "3/600",
                "CHAT_DAILY_TOKENS_USER": "100000",
                "DEBUG_RETURN_RESET_TOKEN": "1",
            },
        )
        tour(server, admin)
        assert admin.acl_log() == [], json.dumps(admin.acl_log(), default=str, indent=1)
        keys = [key.decode() for key in admin.scan_iter()]
        assert keys and all(key.startswith(ACL_PREFIX) for key in keys), keys
    wait_until(lambda: statuses(server)[-1:] == ["GET /auth/healthz 200"], 5, what="last line")
    bad = [s for s in statuses(server) if s.endswith((" 500", " 503"))]
    assert not bad, server.log_text()[-4000:]
    assert "dependency unavailable" not in server.log_text(), server.log_text()[-4000:]
    assert_no_crash(server)


def lock_out(server: Server) -> tuple[str, str]:
    """A new account locked out by RATE_LOGIN_IDENTIFIER=3/600: three wrong passwords from
    fresh browsers, then the right one refused (the uniform 401); (email, password)."""
    email, password = random_email(), strong_password()
    assert server.client().register(email, password).status == 201
    for _ in range(3):
        assert server.client().login(email, "Wrong-pass-123").status == 401
    locked = server.client().login(email, password)
    assert locked.status == 401, locked
    return email, password


def tour(server: Server, admin: redis.Redis) -> None:
    """Every feature that reads or writes Redis, through the HTTP API and the CLI."""
    client, email, password = register_and_login(server, display_name="Tour")
    for _ in range(2):  # the first fills the session cache, the second reads it
        assert client.me().status == 200
    # A cache entry in an older release's format is replaced in a WATCH/MULTI transaction.
    (cached,) = [k for k in admin.scan_iter(match=f"{ACL_PREFIX}sess:*")]
    me = client.me().json()["user"]
    admin.set(cached, str(me["id"]), ex=60)
    assert client.me().json()["user"] == me
    assert json.loads(admin.get(cached))["id"] == me["id"]
    # Concurrent requests finding that entry race to replace it: the losers give up with
    # UNWATCH (a race, so tried a few times; coverage, not a requirement).
    for _ in range(10):
        admin.set(cached, str(me["id"]), ex=60)
        with ThreadPoolExecutor(max_workers=8) as pool:
            assert set(pool.map(lambda _: client.me().status, range(8))) == {200}
        if "cmdstat_unwatch" in admin.info("commandstats"):
            break

    # Wrong passwords up to the identifier's limit (3 in 10 minutes), then the right one
    # refused too (browsers without a device cookie: the account's counter).
    victim_email, victim_password = lock_out(server)
    # The operator lifts it with the CLI, which reaches Redis as the same user.
    done = run_cli(["unlock", victim_email], server.env, server.workdir)
    assert done.returncode == 0, done.stderr
    assert server.client().login(victim_email, victim_password).status == 200

    # Profile: the cached sessions are rewritten (a script).
    assert me_patch(client, {"display_name": "Toured"}).status == 200
    assert client.me().json()["user"]["display_name"] == "Toured"
    assert client.get("/auth/me/export").status == 200

    # Sessions: a second device, listed and revoked.
    other = server.client()
    assert other.login(email, password).status == 200
    listed = client.get("/auth/sessions")
    assert listed.status == 200, listed
    sessions = listed.json()["sessions"]
    assert len(sessions) == 2, sessions
    (theirs,) = [s["id"] for s in sessions if not s["current"]]
    assert client.request("DELETE", f"/auth/sessions/{theirs}").status == 200
    assert other.me().status == 401

    # Chat: two rounds (history kept, budget counted), history, usage, reset.
    for message in ("hello acl", "second round"):
        answer = chat(client, message)
        assert answer.status == 200, answer
        assert b"Echo:" in answer.body, answer
    history = client.get("/chat/history")
    assert history.status == 200 and len(history.json()["messages"]) == 4, history
    usage = client.get("/chat/usage")
    assert usage.status == 200, usage
    assert usage.json()["today"]["tokens"] > 0 and usage.json()["today"]["limit"] == 100000
    anonymous = server.client()
    assert chat(anonymous, "as a visitor").status == 200
    assert anonymous.get("/chat/history").status == 200
    assert client.post("/reset_chat").status == 200
    assert client.get("/chat/history").json()["messages"] == []

    # Password: forgotten (a reset token), reset, changed; the other sessions end.
    forgot = server.client().post("/auth/password/forgot", {"identifier": email})
    assert forgot.status == 200, forgot
    token = forgot.json().get("debug_token")
    assert token, forgot
    new_password = strong_password()
    reset = server.client().post("/auth/password/reset", {"token": token, "password": new_password})
    assert reset.status == 200, reset
    assert client.me().status == 401  # a reset ends every session
    assert client.login(email, new_password).status == 200
    changed = client.post(
        "/auth/password/change",
        {"current_password": new_password, "new_password": (final := strong_password())},
    )
    assert changed.status == 200, changed
    assert client.me().status == 200

    # Logout, then the account deleted (its history, counters and budgets removed).
    assert client.post("/auth/logout").status == 200
    assert client.me().status == 401
    assert client.login(email, final).status == 200
    gone = client.request("DELETE", "/auth/me", json_body={"password": final})
    assert gone.status == 200, gone
    assert server.client().get("/auth/healthz").status == 200


# -- 3. Sentinel -------------------------------------------------------------------------------


@dataclass
class Sample:
    """One answer of the client loop."""

    what: str
    started: float  # time.monotonic() when it was sent
    seconds: float
    status: int  # 0: no answer (a timeout or a refused connection)


def primary_of(sentinel: RedisProcess) -> tuple[str, int]:
    with contextlib.closing(sentinel.client(decode_responses=True)) as client:
        host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
    return host, int(port)


def sentinels_agree(sentinels: list[RedisProcess], replica_port: int) -> bool:
    """Each sentinel knows the two others and the replica, and sees the primary up."""
    for sentinel in sentinels:
        with contextlib.closing(sentinel.client(decode_responses=True)) as client:
            state = client.sentinel_master("mymaster")
            replicas = client.sentinel_slaves("mymaster")
        if state["num-other-sentinels"] != len(sentinels) - 1 or state["is_sdown"]:
            return False
        if [r["port"] for r in replicas if not r["is_sdown"]] != [replica_port]:
            return False
    return True


def replicated(primary: RedisProcess, replica: RedisProcess) -> bool:
    """The replica has applied everything the primary has written so far."""
    with contextlib.closing(primary.client()) as p, contextlib.closing(replica.client()) as r:
        offset = p.info("replication")["master_repl_offset"]
        info = r.info("replication")
    return info.get("master_link_status") == "up" and info["slave_repl_offset"] >= offset


def timed(what: str, call: Any) -> Sample:
    """Send one request; its answer's status (0 for none: refused or timed out) and time."""
    started = time.monotonic()
    try:
        status = call().status
    except OSError:
        status = 0
    return Sample(what, started, time.monotonic() - started, status)


def test_sentinel_pool_waits_for_a_free_connection(
    fleet: Fleet, make_server: ServerFactory
) -> None:
    """Through Sentinel as with REDIS_URL (tests/test_faults.py): with every pooled
    connection busy, a request waits for one (up to twice REDIS_TIMEOUT) instead of
    failing; a burst of requests is not an outage."""
    primary = fleet.redis("redis-alone")
    sentinel = fleet.sentinel("sentinel-alone", primary.port, 1)
    server = make_server.start(
        "embedded",
        {
            **ALL_LIMITS_RAISED,
            "REDIS_SENTINELS": f"127.0.0.1:{sentinel.port}",
            "REDIS_POOL_SIZE": "1",
        },
    )
    forgot = {"identifier": random_email()}
    assert server.client().post("/auth/password/forgot", forgot).status == 200
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(
            pool.map(lambda _: server.client().post("/auth/password/forgot", forgot), range(64))
        )
    refused = [answer for answer in answers if answer.status != 200]
    causes = [line for line in server.logs if "dependency unavailable" in line]
    assert not refused, f"{len(refused)} of 64 refused, e.g. {refused[0]}; log: {causes[:1]}"


@pytest.mark.slow
def test_sentinel_failover(fleet: Fleet, make_server: ServerFactory) -> None:
    """The primary is killed under load: quick 503s (never a 500 or a hang) until the
    sentinels promote the replica, then CloudChat follows it; the session, new sign-ins and
    a login lock (replicated before the kill) all hold, and the lock never lets its
    identifier through meanwhile."""
    # A replica's first full sync starts at once, not after the default 5 s of waiting for
    # more replicas to share it.
    primary = fleet.redis("redis-primary", "--repl-diskless-sync-delay", "0")
    replica = fleet.redis(
        "redis-replica",
        "--replicaof",
        "127.0.0.1",
        str(primary.port),
        "--repl-diskless-sync-delay",
        "0",
    )
    wait_until(lambda: replicated(primary, replica), 10, what="the replica in sync")
    sentinels = [fleet.sentinel(f"sentinel-{i}", primary.port, 2) for i in (1, 2, 3)]
    wait_until(lambda: sentinels_agree(sentinels, replica.port), 15, what="the sentinels to agree")
    server = make_server.start(
        "postgres",
        {
            **ALL_LIMITS_RAISED,
            "REDIS_URL": None,  # the sentinels name the primary
            "REDIS_SENTINELS": ",".join(f"127.0.0.1:{s.port}" for s in sentinels),
            "REDIS_SENTINEL_MASTER": "mymaster",
            "RATE_LOGIN_IDENTIFIER": "3/600",
        },
    )
    prefix = server.env["REDIS_KEY_PREFIX"]
    client, email, password = register_and_login(server)
    assert client.me().status == 200
    victim_email, victim_password = lock_out(server)
    wait_until(lambda: replicated(primary, replica), 5, what="the lock on the replica")

    # Every 50 ms: /auth/me, a chat round, and the locked-out account's right password.
    # The primary dies 1 s in; the loop ends 1 s after chat works again (at most 30 s).
    def victim() -> Response:
        return server.client().login(victim_email, victim_password)

    samples: list[Sample] = []
    kill_at = time.monotonic() + 1.0
    killed_at = float("inf")
    recovered_at: float | None = None
    while time.monotonic() < kill_at + 30.0:
        if killed_at == float("inf") and time.monotonic() >= kill_at:
            primary.kill()
            killed_at = time.monotonic()
        samples.append(timed("me", client.me))
        samples.append(timed("chat", lambda: chat(client, "are you there")))
        samples.append(timed("victim", victim))
        chats = [s.status for s in samples if s.what == "chat" and s.started >= killed_at]
        if recovered_at is None and set(chats) != {200} and chats[-2:] == [200, 200]:
            recovered_at = time.monotonic()
        if recovered_at is not None and time.monotonic() > recovered_at + 1.0:
            break
        time.sleep(0.05)
    promoted = primary_of(sentinels[0])

    before = [s for s in samples if s.started < killed_at]
    assert all(s.status == (401 if s.what == "victim" else 200) for s in before), before
    after = [s for s in samples if s.started >= killed_at]
    chats = [s for s in after if s.what == "chat"]
    failed = [s for s in after if s.status not in (200, 401)]
    first_failure = min((s.started - killed_at for s in failed), default=0.0)
    first_back = min(
        (
            s.started - killed_at
            for s in chats
            if s.status == 200 and s.started - killed_at > first_failure
        ),
        default=None,
    )
    slowest = max(samples, key=lambda s: s.seconds)
    summary = (
        f"Sentinel failover: {len(after)} requests after the kill ({len(chats)} chats),"
        f" {len(failed)} failed (statuses {sorted({s.status for s in failed})}, endpoints"
        f" {sorted({s.what for s in failed})}); first 503 {first_failure:.2f} s after the"
        f" kill, first chat 200 after it at {first_back and round(first_back, 2)} s; slowest"
        f" request {slowest.seconds:.3f} s ({slowest.what}); new primary {promoted}"
    )
    print(summary)
    assert promoted == ("127.0.0.1", replica.port), summary
    assert {s.status for s in samples if s.what != "victim"} <= {200, 503}, summary
    # Locked out throughout: the uniform 401, or 503 while no counter can be read.
    assert {s.status for s in samples if s.what == "victim"} <= {401, 503}, summary
    assert slowest.seconds < QUICK, summary
    assert failed, f"no request failed: was the primary in use? {summary}"
    assert first_back is not None, summary
    assert first_back - first_failure < 15.0, summary
    # /auth/me never failed: a session is durable in SQL, the cache is only a cache.
    assert all(s.status == 200 for s in after if s.what == "me"), summary

    # After: the session, a new sign-in; the lock is still there (the replica had the
    # counter), and the operator's unlock reaches the new primary through the sentinels.
    assert client.me().status == 200
    assert server.client().login(email, password).status == 200
    assert victim().status == 401
    done = run_cli(["unlock", victim_email], server.env, server.workdir)
    assert done.returncode == 0, done.stderr
    assert victim().status == 200
    with contextlib.closing(replica.client(decode_responses=True)) as new_primary:
        assert new_primary.execute_command("ROLE")[0] == "master"
        assert list(new_primary.scan_iter(match=f"{prefix}sess:*")), "no cached session"
    health = server.client().get("/auth/healthz")
    assert health.status == 200, health
    assert_no_crash(server)
