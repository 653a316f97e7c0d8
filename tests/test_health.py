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


def test_healthz_answers_while_the_database_pool_is_busy(make_server: ServerFactory) -> None:
    """The one pooled connection (DB_POOL_SIZE=1) waits on a table lock inside a
    registration: the health check still answers 200 with db true at once, from a
    connection of its own. (Through the pool it waited DB_TIMEOUT and said the database
    was down: a load balancer would take a busy instance out.)"""
    import threading

    import psycopg2

    srv = make_server.start("postgres", {"DB_POOL_SIZE": "1", "DB_TIMEOUT": "8"})
    locker = psycopg2.connect(srv.env["DATABASE_URL"])
    try:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        answers: list[int] = []
        body = {"email": "pool-busy@example.com", "password": "a long enough passphrase 1"}
        register = threading.Thread(
            target=lambda: answers.append(srv.client().post("/auth/register", body).status)
        )
        register.start()

        def register_waits_on_the_lock() -> bool:
            with locker.cursor() as cursor:  # in the locking transaction: it sees the waiter
                cursor.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = "
                    "'users'::regclass"
                )
                return cursor.fetchone()[0] > 0

        wait_until(register_waits_on_the_lock, 15, what="the registration to wait on the lock")
        response = srv.client().get("/auth/healthz", timeout=15)
        assert response.status == 200, response
        assert response.json()["db"] is True
        locker.rollback()  # the registration goes on
        register.join(15)
        assert answers and answers[0] in (200, 201), answers
    finally:
        locker.close()
