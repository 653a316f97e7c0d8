"""Rate limits on register and login, client IP behind proxies, and concurrent bursts."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import SETUPS, ServerFactory
from tests.helpers import (
    INVALID_CREDENTIALS,
    Response,
    assert_error,
    random_email,
    random_hex,
    strong_password,
)

HIGH = "100000/3600"


def _random_ip() -> str:
    """Return a random address from 198.18.0.0/15 (benchmarking range; never contacted)."""
    raw = bytes.fromhex(random_hex(2))
    return f"198.18.{raw[0]}.{raw[1] or 1}"


def _assert_429(response: Response) -> None:
    """Assert a 429 rate_limited answer with a sensible integer Retry-After."""
    assert_error(response, 429, "rate_limited")
    retry_after = response.header("Retry-After")
    assert retry_after is not None and retry_after.isdigit(), retry_after
    assert 0 < int(retry_after) <= 3600


def _assert_uniform_401(response: Response) -> None:
    """Assert the uniform login failure."""
    assert response.status == 401, response
    assert response.json() == INVALID_CREDENTIALS
    assert response.cookie("cc_auth") is None


def test_register_limit_per_ip(make_server: ServerFactory) -> None:
    """The fourth registration from one IP within the window is 429 with Retry-After."""
    srv = make_server.start("embedded", {"RATE_REGISTER_IP": "3/3600", "RATE_REGISTER_EMAIL": HIGH})
    client = srv.client()
    for _ in range(3):
        assert client.register(random_email(), strong_password()).status == 201
    _assert_429(client.register(random_email(), strong_password()))
    # Another client address (reported by the trusted loopback proxy) is not limited.
    other = srv.client({"X-Forwarded-For": "203.0.113.50"})
    assert other.register(random_email(), strong_password()).status == 201


def test_register_limit_per_email(make_server: ServerFactory) -> None:
    """Attempts for one normalised email are limited, whatever its case or spacing."""
    srv = make_server.start("embedded", {"RATE_REGISTER_IP": HIGH, "RATE_REGISTER_EMAIL": "3/3600"})
    email = random_email()
    statuses = []
    for variant in (email, email.upper(), f" {email} "):
        client = srv.client({"X-Forwarded-For": _random_ip()})
        statuses.append(client.register(variant, strong_password()).status)
    assert statuses == [201, 409, 409]
    _assert_429(
        srv.client({"X-Forwarded-For": _random_ip()}).register(email.title(), strong_password())
    )
    assert srv.client().register(random_email(), strong_password()).status == 201


@pytest.mark.parametrize("setup", SETUPS)
def test_retry_after_waits_for_every_exceeded_limit(make_server: ServerFactory, setup: str) -> None:
    """Over both register limits at once: Retry-After is the later of the two reopenings."""
    srv = make_server.start(setup, {"RATE_REGISTER_IP": "1/600", "RATE_REGISTER_EMAIL": "1/3000"})
    client, email = srv.client(), random_email()
    assert client.register(email, strong_password()).status == 201
    response = client.register(email, strong_password())
    _assert_429(response)
    assert 2990 <= int(response.header("Retry-After") or 0) <= 3000


def test_login_limit_per_ip(make_server: ServerFactory) -> None:
    """Over the per-IP quota even the right password gets the uniform 401."""
    srv = make_server.start("embedded", {"RATE_LOGIN_IP": "3/600", "RATE_LOGIN_IDENTIFIER": HIGH})
    email, password = random_email(), strong_password()
    assert srv.client().register(email, password).status == 201
    client = srv.client()
    assert client.login(email, password).status == 200
    _assert_uniform_401(client.login(random_email(), password))
    _assert_uniform_401(client.login(email, "wrong-" + password))
    _assert_uniform_401(client.login(email, password))
    assert srv.client({"X-Forwarded-For": "203.0.113.60"}).login(email, password).status == 200


def test_login_limit_per_identifier(make_server: ServerFactory) -> None:
    """Over the per-identifier quota, from any IP, the right password gets the uniform 401."""
    srv = make_server.start("embedded", {"RATE_LOGIN_IP": HIGH, "RATE_LOGIN_IDENTIFIER": "3/600"})
    email, password = random_email(), strong_password()
    other_email = random_email()
    assert srv.client().register(email, password).status == 201
    assert srv.client().register(other_email, password).status == 201
    for variant in (email, email.upper(), f"  {email}"):
        client = srv.client({"X-Forwarded-For": _random_ip()})
        _assert_uniform_401(client.login(variant, "wrong-" + password))
    _assert_uniform_401(srv.client({"X-Forwarded-For": _random_ip()}).login(email, password))
    assert srv.client().login(other_email, password).status == 200


def test_spoofed_forwarded_for_does_not_escape_the_limit(make_server: ServerFactory) -> None:
    """Behind the trusted loopback proxy, a client's own left-hand XFF entries are ignored."""
    srv = make_server.start("embedded", {"RATE_LOGIN_IP": "3/600", "RATE_LOGIN_IDENTIFIER": HIGH})
    email, password = random_email(), strong_password()
    assert srv.client().register(email, password).status == 201
    attempts = [
        f"{_random_ip()}, 203.0.113.7",
        f"{_random_ip()}, {_random_ip()}, 203.0.113.7",
        f"{_random_ip()}, 203.0.113.7, 127.0.0.1",
    ]
    for xff in attempts:
        response = srv.client({"X-Forwarded-For": xff}).login(email, "wrong-" + password)
        _assert_uniform_401(response)
    spoof = srv.client({"X-Forwarded-For": f"{_random_ip()}, 203.0.113.7"})
    _assert_uniform_401(spoof.login(email, password))
    # The limit is per client: a different real client address still logs in.
    assert srv.client({"X-Forwarded-For": "203.0.113.8"}).login(email, password).status == 200


def test_forwarded_for_ignored_without_trusted_proxies(make_server: ServerFactory) -> None:
    """With TRUSTED_PROXIES empty, X-Forwarded-For never changes the rate-limit key."""
    srv = make_server.start(
        "embedded",
        {"TRUSTED_PROXIES": "", "RATE_LOGIN_IP": "3/600", "RATE_LOGIN_IDENTIFIER": HIGH},
    )
    email, password = random_email(), strong_password()
    assert srv.client().register(email, password).status == 201
    for _ in range(3):
        client = srv.client({"X-Forwarded-For": _random_ip()})
        _assert_uniform_401(client.login(email, "wrong-" + password))
    _assert_uniform_401(srv.client({"X-Forwarded-For": _random_ip()}).login(email, password))
    _assert_uniform_401(srv.client().login(email, password))


@pytest.mark.parametrize("setup", SETUPS)
def test_concurrent_login_burst_respects_the_limit(make_server: ServerFactory, setup: str) -> None:
    """N+5 simultaneous logins with the right password: at most N get through."""
    limit = 5
    srv = make_server.start(setup, {"RATE_LOGIN_IP": f"{limit}/600", "RATE_LOGIN_IDENTIFIER": HIGH})
    email, password = random_email(), strong_password()
    assert srv.client({"X-Forwarded-For": "203.0.113.99"}).register(email, password).status == 201
    total = limit + 5
    barrier = threading.Barrier(total)

    def attempt() -> Response:
        """Wait for every thread, then log in once."""
        barrier.wait(timeout=10)
        return srv.client().login(email, password)

    with ThreadPoolExecutor(max_workers=total) as pool:
        futures = [pool.submit(attempt) for _ in range(total)]
        results = [future.result(timeout=30) for future in futures]
    statuses = sorted(r.status for r in results)
    passed = statuses.count(200)
    assert set(statuses) <= {200, 401}, statuses
    assert 1 <= passed <= limit, statuses
    for response in results:
        if response.status == 401:
            assert response.json() == INVALID_CREDENTIALS
