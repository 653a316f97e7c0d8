"""Dependencies that go away for real: a private redis-server stopped and started again."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import RedisDb, ServerFactory, unavailable
from tests.helpers import (
    HIGH_LIMITS,
    assert_error,
    free_port,
    logged,
    random_email,
    register_and_login,
    run_cli,
    strong_password,
    wait_until,
)
from tests.hostile_net import SlowTcpProxy


class PrivateRedis:
    """A redis-server of this test's own on a free loopback port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        """Pick a port; nothing runs yet."""
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, 10, what="the private redis-server")

    def answers(self) -> bool:
        """True if it answers PING."""
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, timeout=5
        )
        return done.stdout.strip() == b"PONG"

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) and wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class PrivatePostgres:
    """A PostgreSQL cluster of this test's own (initdb + pg_ctl) on a free loopback port."""

    def __init__(self) -> None:
        """Create the cluster; it is not running yet."""
        binaries = shutil.which("pg_ctl") and shutil.which("initdb")
        if not binaries:
            unavailable("initdb / pg_ctl are not installed")
        self.port = free_port()
        # initdb refuses to run as root: the cluster belongs to an unprivileged user.
        self.user = "postgres" if os.geteuid() == 0 else None
        self.dir = Path(tempfile.mkdtemp(prefix="cc-pg-"))
        self.data = self.dir / "data"
        if self.user:
            shutil.chown(self.dir, self.user)
        self._run(["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"])

    def _run(self, args: list[str]) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run(prefix + args, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        log_file = str(self.dir / "postgres.log")
        self._run(
            [
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                log_file,
                "-o",
                options,
                "-w",
                "-t",
                "30",
                "start",
            ]
        )

    def stop(self) -> None:
        """Stop it at once, as a crash or the OOM killer would."""
        self._run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def url(self) -> str:
        """The connection URL of its postgres database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def remove(self) -> None:
        """Stop if running, delete the files."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL with CloudChat's schema, running; removed at the end."""
    cluster = PrivatePostgres()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private Redis, started; stopped at the end whatever happened."""
    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        unavailable("redis-server / redis-cli are not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_outage_and_return(make_server: ServerFactory, private_redis: PrivateRedis) -> None:
    env = {**HIGH_LIMITS, "REDIS_URL": f"redis://127.0.0.1:{private_redis.port}/0"}
    server = make_server.start("postgres", env)
    leaving, email, password = register_and_login(server)
    staying, _, _ = register_and_login(server)
    assert leaving.me().status == 200 and staying.me().status == 200

    private_redis.stop()
    # Sessions keep working from SQL.
    me = staying.me()
    assert me.status == 200, me
    # ... and the log says so once, not once per request (each still has its access line).
    for _ in range(20):
        assert staying.me().status == 200
    wait_until(lambda: server.log_text().count("GET /auth/me 200") >= 23, 5, what="access lines")
    assert server.log_text().count("session cache unavailable") == 1, server.log_text()[-3000:]
    # Rate-limited actions fail closed, as JSON, for the cause the log names (how quickly:
    # bench/soak.py's redis-stop minute).
    for response in (
        server.client().login(email, password),
        server.client().register(random_email(), strong_password()),
        server.client().post("/auth/password/forgot", {"identifier": email}),
        server.client().post("/deepseek_chat", {"message": "hi"}),
    ):
        assert_error(response, 503, "unavailable")
    logged(server, "dependency unavailable, answered 503: redis:")
    health = server.client().get("/auth/healthz")
    assert health.status == 503 and health.json() == {"ok": False, "redis": False, "db": True}
    # Logout still ends the session: SQL is the authority.
    assert leaving.post("/auth/logout").status == 200
    assert leaving.me().status == 401

    private_redis.start()  # back, and empty
    wait_until(
        lambda: server.client().get("/auth/healthz").status == 200, 10, what="healthz recovers"
    )
    assert staying.me().status == 200  # read back from SQL into the empty cache
    assert leaving.me().status == 401
    fresh = server.client()
    assert fresh.login(email, password).status == 200
    assert fresh.me().status == 200


def test_slow_redis_means_waiting_not_failing(
    make_server: ServerFactory, redis_db: RedisDb
) -> None:
    """A Redis that answers, but late: requests queue for the one pooled connection for up
    to twice REDIS_TIMEOUT (a busy process or Redis is not an outage), and all succeed."""
    proxy = SlowTcpProxy(("127.0.0.1", 6379), delay=0.2)
    try:
        server = make_server.start(
            "postgres",
            {
                **HIGH_LIMITS,
                "REDIS_URL": f"redis://127.0.0.1:{proxy.port}/{redis_db.number}",
                "REDIS_TIMEOUT": "0.5",
                "REDIS_POOL_SIZE": "1",
            },
        )
        forgot = {"identifier": random_email()}
        assert server.client().post("/auth/password/forgot", forgot).status == 200
        # Four at once through one connection answering in 0.2 s: the last waits 0.6 s.
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(
                pool.map(lambda _: server.client().post("/auth/password/forgot", forgot), range(4))
            )
        assert [a.status for a in answers] == [200] * 4, answers
    finally:
        proxy.close()


def run_initdb(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python cloudchat.py initdb` against the given settings."""
    from tests.helpers import base_env

    return run_cli(["initdb"], {**base_env(), **env}, cwd)


def test_postgres_outage_and_return(
    make_server: ServerFactory, private_postgres: PrivatePostgres
) -> None:
    env = {**HIGH_LIMITS, "DATABASE_URL": private_postgres.url(), "DB_TIMEOUT": "2"}
    assert run_initdb(env, private_postgres.dir).returncode == 0
    server = make_server.start("embedded", env)
    client, email, password = register_and_login(server)

    private_postgres.stop()
    for response in (
        client.me(),
        server.client().login(email, password),
        server.client().register(lost := random_email(), strong_password()),
    ):
        assert_error(response, 503, "unavailable")
    logged(server, "dependency unavailable, answered 503: database:")
    health = server.client().get("/auth/healthz")
    assert health.status == 503 and health.json() == {"ok": False, "redis": True, "db": False}

    private_postgres.start()
    wait_until(
        lambda: server.client().get("/auth/healthz").status == 200, 15, what="healthz recovers"
    )
    assert client.me().status == 200  # the session row outlived the outage
    # The registration during the outage left nothing behind: the address is free.
    assert server.client().register(lost, strong_password()).status == 201
