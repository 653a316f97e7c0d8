"""What the database holds: inactive accounts, Argon2 re-hashing, uniqueness under races."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import SETUPS, ServerFactory
from tests.helpers import (
    INVALID_CREDENTIALS,
    UNAUTHORIZED,
    Response,
    Server,
    random_email,
    random_phone,
    register_and_login,
    run_cli,
    sql_rows,
    strong_password,
    wait_until,
)


def _concurrently(count: int, action: Callable[[int], Response]) -> list[Response]:
    """Run action(i) for i in range(count) in threads released at the same moment."""
    barrier = threading.Barrier(count)

    def one(index: int) -> Response:
        """Wait for every thread, then act."""
        barrier.wait(timeout=10)
        return action(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(one, i) for i in range(count)]
        return [future.result(timeout=30) for future in futures]


def test_deactivate_ends_live_sessions_at_once(server: Server) -> None:
    """`cloudchat.py deactivate` refuses logins and ends a live (cached) session at once."""
    client, email, password = register_and_login(server)
    other, _, _ = register_and_login(server)
    assert client.me().status == 200  # the session is now in the cache, where there is one
    done = run_cli(["deactivate", email.upper()], server.env, server.workdir)
    assert done.returncode == 0, done.stderr
    assert "1 live session(s) ended" in done.stdout
    assert client.me().json() == UNAUTHORIZED
    response = server.client().login(email, password)
    assert response.status == 401
    assert response.json() == INVALID_CREDENTIALS
    assert other.me().status == 200
    done = run_cli(["activate", email], server.env, server.workdir)
    assert done.returncode == 0, done.stderr
    assert server.client().login(email, password).status == 200
    assert client.me().json() == UNAUTHORIZED  # ended sessions stay ended


def test_deactivate_names_an_unknown_account(server: Server) -> None:
    """The command says so, with exit code 1, for an address without an account."""
    done = run_cli(["deactivate", random_email()], server.env, server.workdir)
    assert done.returncode == 1
    assert "no account" in done.stderr


@pytest.mark.parametrize("setup", SETUPS)
def test_deactivation_in_sql_reaches_live_sessions(make_server: ServerFactory, setup: str) -> None:
    """An account deactivated straight in SQL: logins fail at once; a live session ends
    within SESSION_CACHE_SECONDS with Redis, at once with the embedded store."""
    server = make_server.start(setup, {"SESSION_CACHE_SECONDS": "1"})
    client, email, password = register_and_login(server)
    assert client.me().status == 200
    sql_rows(server, "UPDATE users SET is_active = false WHERE email = %s", (email,))
    response = server.client().login(email, password)
    assert response.status == 401
    assert response.json() == INVALID_CREDENTIALS
    if setup == "embedded":
        assert client.me().json() == UNAUTHORIZED
    else:
        wait_until(lambda: client.me().status == 401, timeout=5, what="the session to end")
    assert client.me().json() == UNAUTHORIZED


@pytest.mark.parametrize("setup", SETUPS)
def test_old_argon2_parameters_are_rehashed_on_login(
    make_server: ServerFactory, setup: str
) -> None:
    """A hash made with older Argon2 parameters is replaced by a current one at login."""
    old = make_server.start(setup)
    email, password = random_email(), strong_password()
    assert old.client().register(email, password).status == 201
    sql = "SELECT c.secret FROM credentials c JOIN users u ON u.id = c.user_id WHERE u.email = %s"
    (before,) = sql_rows(old, sql, (email,))[0].values()
    assert "t=1" in before and password not in before
    old.stop()
    new = make_server.launch(setup, {**old.env, "ARGON2_TIME_COST": "2"}, old.workdir)
    assert new.client().login(email, "wrong-" + password).status == 401
    assert sql_rows(new, sql, (email,))[0]["secret"] == before
    assert new.client().login(email, password).status == 200
    (after,) = sql_rows(new, sql, (email,))[0].values()
    assert after != before and "t=2" in after
    assert new.client().login(email, password).status == 200


def test_concurrent_registrations_of_one_email(server: Server) -> None:
    """Simultaneous registrations of one address: exactly one 201, the rest 409, no 5xx."""
    email = random_email()
    results = _concurrently(
        6, lambda i: server.client().register(email.upper() if i % 2 else email, strong_password())
    )
    statuses = sorted(r.status for r in results)
    assert statuses == [201, 409, 409, 409, 409, 409], results


def test_concurrent_registrations_of_one_phone(server: Server) -> None:
    """Simultaneous registrations of one phone: exactly one 201, the rest 409 phone_taken."""
    digits, formatted = random_phone()
    phones = [formatted, f"+{digits}"]
    results = _concurrently(
        6,
        lambda i: server.client().register(random_email(), strong_password(), phone=phones[i % 2]),
    )
    statuses = sorted(r.status for r in results)
    assert statuses == [201, 409, 409, 409, 409, 409], results
    assert all(r.json()["code"] == "phone_taken" for r in results if r.status == 409)


def test_pooled_connections_killed_by_postgres_are_replaced(make_server: ServerFactory) -> None:
    """A restart or PgBouncer timeout closes idle connections: none is lent out dead."""
    server = make_server.start("postgres", {"DB_POOL_SIZE": "3"})
    client, _, _ = register_and_login(server)
    assert client.me().status == 200
    dbname = server.env["DATABASE_URL"].rsplit("/", 1)[1]
    killed = sql_rows(
        server,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    )
    assert killed, "the server held no pooled connection to kill"

    def backends_gone() -> bool:
        """pg_terminate_backend only signals: wait until the backends have exited."""
        rows = sql_rows(
            server,
            "SELECT count(*) AS n FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        return rows[0]["n"] == 0

    wait_until(backends_gone, 10, what="the terminated backends to exit")
    for _ in range(3):
        assert client.me().status == 200
        assert server.client().get("/auth/healthz").status == 200
