"""Security headers, request ids, request logs and GET /test."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.helpers import (
    SECURITY_HEADERS,
    Client,
    Response,
    Server,
    random_email,
    register_and_login,
    strong_password,
    wait_until,
)


def _auth_answers(server: Server) -> dict[str, Response]:
    """Collect /auth/* answers of many kinds: 2xx, 4xx, with and without a session."""
    client, email, password = register_and_login(server)
    anon = server.client()
    answers = {
        "me-200": client.me(),
        "me-401": anon.me(),
        "healthz": anon.get("/auth/healthz"),
        "register-201": anon.register(random_email(), strong_password()),
        "register-400": anon.register("not-an-email", strong_password()),
        "register-409": anon.register(email, strong_password()),
        "login-401": anon.login(email, "wrong-" + password),
        "unknown-404": anon.get("/auth/does-not-exist"),
        "get-on-post-405": anon.get("/auth/login"),
        "bad-json-400": anon.post(
            "/auth/login", body=b"{", headers={"Content-Type": "application/json"}
        ),
        "text-plain-415": anon.post(
            "/auth/login", body=b"hi", headers={"Content-Type": "text/plain"}
        ),
        "too-large-413": anon.post(
            "/auth/register",
            body=b'{"x": "' + b"a" * 70_000 + b'"}',
            headers={"Content-Type": "application/json"},
        ),
        "login-200": anon.login(email, password),
        "logout-200": client.post("/auth/logout"),
    }
    return answers


def test_security_headers_on_every_auth_answer(server: Server) -> None:
    """Every /auth/* answer, success or failure, carries the four security headers."""
    missing = {}
    for name, response in _auth_answers(server).items():
        wrong = {
            header: response.header(header)
            for header, expected in SECURITY_HEADERS.items()
            if (response.header(header) or "").lower() != expected.lower()
        }
        if wrong:
            missing[f"{name} ({response.status})"] = wrong
    assert not missing, f"security headers missing or wrong: {missing}"


def test_every_answer_has_a_request_id(server: Server) -> None:
    """X-Request-ID is on every answer, unique per request, /auth/* or not, error or not."""
    client = server.client()
    answers = [
        client.get("/test"),
        client.get("/test"),
        client.get("/no/such/route"),
        client.get("/auth/me"),
        client.post("/auth/register", body=b"[", headers={"Content-Type": "application/json"}),
        client.request("DELETE", "/auth/logout"),
    ]
    ids = [response.header("X-Request-ID") for response in answers]
    assert all(ids), list(zip(ids, answers, strict=True))
    assert len(set(ids)) == len(ids)


def test_test_route_returns_timestamp_and_request_id(server: Server) -> None:
    """GET /test answers a float timestamp and the request id of its X-Request-ID header."""
    response = server.client().get("/test")
    assert response.status == 200, response
    body = response.json()
    assert isinstance(body["timestamp"], float)
    assert abs(body["timestamp"] - time.time()) < 60
    assert isinstance(body["request_id"], str)
    assert body["request_id"] == response.header("X-Request-ID")
    uuid.UUID(body["request_id"])


def test_request_log_line(server: Server) -> None:
    """One log line per request with method, path, status, duration and rid."""
    response = server.client().get("/test")
    rid = response.header("X-Request-ID")
    lines = wait_until(
        lambda: [line for line in server.logs if f"rid={rid}" in line],
        timeout=5,
        what="the request's log line",
    )
    assert len(lines) == 1, lines
    line = lines[0]
    for part in ("GET", "/test", "200", "ms"):
        assert part in line, line


@pytest.mark.parametrize("path", ["/nope%0Afake-log-line", "/nope%0D%0Afake-log-line"])
def test_log_lines_cannot_be_forged(server: Server, path: str) -> None:
    """Control characters in a path are escaped, so a request cannot forge a log line."""
    response = Client("127.0.0.1", server.port).get(path)
    assert response.status == 404, response
    rid = response.header("X-Request-ID")
    wait_until(
        lambda: any(f"rid={rid}" in line for line in server.logs),
        timeout=5,
        what="the request's log line",
    )
    assert not [line for line in server.logs if line.startswith("fake-log-line")]


@pytest.mark.parametrize("incoming", ["evil id rid=forged", "x" * 200, "shrt-1", "a\tb-12345678"])
def test_malformed_incoming_request_id_is_replaced(server: Server, incoming: str) -> None:
    """A client's malformed X-Request-ID is never echoed or logged; the server makes its own."""
    response = server.client({"X-Request-ID": incoming}).get("/test")
    rid = response.header("X-Request-ID")
    assert rid and rid != incoming
    assert response.json()["request_id"] == rid
    wait_until(
        lambda: any(f"rid={rid}" in line for line in server.logs),
        timeout=5,
        what="the request's log line",
    )
    assert not any(incoming in line for line in server.logs)
