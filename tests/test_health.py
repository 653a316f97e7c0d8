"""GET /auth/healthz with working, missing and hanging dependencies."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import ServerFactory
from tests.helpers import Server, SilentTcpServer, free_port, wait_until


def test_healthz_ok(server: Server) -> None:
    """Both dependencies answer: 200 {"ok": true, "redis": true, "db": true}."""
    response = server.client().get("/auth/healthz")
    assert response.status == 200, response
    body = response.json()
    assert body["ok"] is True
    assert body["redis"] is True
    assert body["db"] is True


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A loopback TCP port that accepts connections and never answers a byte."""
    silent = SilentTcpServer()
    try:
        yield silent.port
    finally:
        silent.close()


def _assert_redis_down(srv: Server, cause: str) -> None:
    """Assert healthz says 503 with redis false and db true, and the log line naming the cause
    (the client's 15 s timeout is the deadline; how fast belongs to bench/soak.py)."""
    response = srv.client().get("/auth/healthz", timeout=15)
    assert response.status == 503, response
    body = response.json()
    assert body["ok"] is False
    assert body["redis"] is False
    assert body["db"] is True
    wait_until(lambda: cause in srv.log_text(), 5, what=f"the line {cause!r}")


def test_healthz_with_redis_port_closed(make_server: ServerFactory) -> None:
    """REDIS_URL at a closed port: 503 with redis false, promptly."""
    srv = make_server.start("embedded", {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    _assert_redis_down(srv, "health check: redis down: redis: Error 111 connecting")


def test_healthz_with_redis_hanging(make_server: ServerFactory, silent_listener: int) -> None:
    """REDIS_URL at a server that never answers: 503 with redis false, promptly."""
    srv = make_server.start("embedded", {"REDIS_URL": f"redis://127.0.0.1:{silent_listener}/0"})
    _assert_redis_down(srv, "health check: redis down: redis: Timeout")


def test_healthz_with_database_down(make_server: ServerFactory) -> None:
    """DATABASE_URL at a closed port: 503 with db false, promptly, and the server still serves."""
    srv = make_server.start(
        "postgres", {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nope"}
    )
    response = srv.client().get("/auth/healthz", timeout=15)
    assert response.status == 503, response
    body = response.json()
    assert body["ok"] is False
    assert body["db"] is False
    assert body["redis"] is True
    cause = "health check: db down: database:"
    wait_until(lambda: cause in srv.log_text(), 5, what=f"the line {cause!r}")
    me = srv.client().me()
    assert me.status == 401, me  # no session to look up: no database needed
