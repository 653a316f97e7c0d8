"""Dependencies that go away for real: a private redis-server stopped and started again."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerFactory, unavailable
from tests.helpers import (
    HIGH_LIMITS,
    assert_error,
    free_port,
    random_email,
    register_and_login,
    strong_password,
    wait_until,
)


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
    assert me.status == 200 and me.elapsed < 3, me
    # Rate-limited actions fail closed, quickly, as JSON.
    for response in (
        server.client().login(email, password),
        server.client().register(random_email(), strong_password()),
        server.client().post("/auth/password/forgot", {"identifier": email}),
        server.client().post("/deepseek_chat", {"message": "hi"}),
    ):
        assert_error(response, 503, "unavailable")
        assert response.elapsed < 3, response
    health = server.client().get("/auth/healthz")
    assert health.status == 503 and health.json() == {"ok": False, "redis": False, "db": True}
    assert health.elapsed < 3
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
