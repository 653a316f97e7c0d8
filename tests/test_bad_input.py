"""Bad input never gets a 5xx: every failure is the JSON envelope with a 4xx status."""

from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ServerFactory
from tests.helpers import Response, Server, assert_error, random_email, strong_password

JSON_HEADERS = {"Content-Type": "application/json"}
POST_ROUTES = ["/auth/register", "/auth/login", "/auth/logout"]
# Logout is "always 200" in the contract and reads no body, so body checks skip it.
BODY_ROUTES = ["/auth/register", "/auth/login"]
FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("route", ["/auth/register", "/auth/login"])
@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"email": }', b"{'email': 'a@b.c'}", b'{"a": 1,}', b"nul", b'{"a": "\\x"}'],
)
def test_malformed_json_is_400(server: Server, route: str, raw: bytes) -> None:
    """Syntactically broken JSON is 400 invalid_json."""
    response = server.client().post(route, body=raw, headers=JSON_HEADERS)
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize("route", ["/auth/register", "/auth/login"])
@pytest.mark.parametrize("raw", [b"[1, 2]", b'["a@b.c", "pw"]', b'"text"', b"42", b"null", b"true"])
def test_non_object_json_is_400(server: Server, route: str, raw: bytes) -> None:
    """Valid JSON that is not an object is a 400."""
    response = server.client().post(route, body=raw, headers=JSON_HEADERS)
    assert_error(response, 400, ("invalid_json", "invalid_input"))


@pytest.mark.parametrize("route", ["/auth/register", "/auth/login"])
@pytest.mark.parametrize(
    "raw",
    [b'{"email": "\xff\xfe@example.com", "password": "x"}', b"\xff\xfe{}", b"\x80"],
)
def test_non_utf8_body_is_400(server: Server, route: str, raw: bytes) -> None:
    """Bytes that are not UTF-8 are a 400."""
    response = server.client().post(route, body=raw, headers=JSON_HEADERS)
    assert_error(response, 400, ("invalid_json", "invalid_input"))


@pytest.mark.parametrize("route", BODY_ROUTES)
def test_oversized_body_is_413(server: Server, route: str) -> None:
    """A body over MAX_BODY_BYTES (default 65536) is 413 body_too_large."""
    raw = json.dumps({"email": random_email(), "pad": "a" * 70_000}).encode()
    response = server.client().post(route, body=raw, headers=JSON_HEADERS)
    assert_error(response, 413, "body_too_large")


def test_declared_oversized_body_is_413_without_reading_it(server: Server) -> None:
    """A Content-Length over the limit is refused at once, without waiting for the body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.putrequest("POST", "/auth/register")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10_000_000))
        conn.endheaders(b'{"email": "')
        raw = conn.getresponse()
        response = Response(raw.status, raw.msg, raw.read(), 0.0)
    finally:
        conn.close()
    assert_error(response, 413, "body_too_large")


def test_body_at_the_limit_is_accepted(make_server: ServerFactory) -> None:
    """MAX_BODY_BYTES is configurable; a body just under it is read, just over it is 413."""
    srv = make_server.start("embedded", {"MAX_BODY_BYTES": "1024"})
    body = {"email": random_email(), "password": strong_password(), "pad": ""}
    size = len(json.dumps(body).encode())
    body["pad"] = "p" * (1024 - size)
    raw = json.dumps(body).encode()
    assert len(raw) == 1024
    assert srv.client().post("/auth/register", body=raw, headers=JSON_HEADERS).status == 201
    body["email"], body["pad"] = random_email(), body["pad"] + "p"
    response = srv.client().post(
        "/auth/register", body=json.dumps(body).encode(), headers=JSON_HEADERS
    )
    assert_error(response, 413, "body_too_large")


@pytest.mark.parametrize("route", BODY_ROUTES)
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_wrong_content_type_is_415(server: Server, route: str, content_type: str) -> None:
    """A Content-Type other than application/json is 415 unsupported_media_type."""
    raw = b'{"email": "a@example.com", "password": "Pw-12345678"}'
    response = server.client().post(route, body=raw, headers={"Content-Type": content_type})
    assert_error(response, 415, "unsupported_media_type")


def test_json_content_type_with_charset_is_accepted(server: Server) -> None:
    """application/json with a charset parameter is still JSON."""
    raw = json.dumps({"email": random_email(), "password": strong_password()}).encode()
    headers = {"Content-Type": "application/json; charset=utf-8"}
    response = server.client().post("/auth/register", body=raw, headers=headers)
    assert response.status == 201, response


def test_bodyless_post_is_an_empty_object(server: Server) -> None:
    """POST without body or Content-Type is {}: register says invalid_email, logout 200."""
    client = server.client()
    assert_error(client.post("/auth/register"), 400, "invalid_email")
    assert client.post("/auth/logout").status == 200
    response = client.post("/auth/login")
    assert_error(response, 400, "invalid_input")


def test_empty_json_body_is_not_a_5xx(server: Server) -> None:
    """An empty body declared as JSON is a 400."""
    response = server.client().post("/auth/register", body=b"", headers=JSON_HEADERS)
    assert_error(response, 400, ("invalid_json", "invalid_email", "invalid_input"))


@pytest.mark.parametrize("path", ["/nope", "/auth/nope", "/auth/me/extra", "/auth", "/index.php"])
def test_unknown_route_is_404_json(server: Server, path: str) -> None:
    """An unknown path is a 404 JSON envelope."""
    assert_error(server.client().get(path), 404, "not_found")
    assert_error(server.client().post(path, {}), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/auth/register"),
        ("GET", "/auth/login"),
        ("GET", "/auth/logout"),
        ("POST", "/auth/me"),
        ("PUT", "/auth/login"),
        ("PUT", "/auth/me"),
        ("PATCH", "/auth/register"),
        ("POST", "/auth/healthz"),
        ("POST", "/test"),
    ],
)
def test_wrong_method_is_405_json(server: Server, method: str, path: str) -> None:
    """A known path with the wrong method is a 405 JSON envelope."""
    response = server.client().request(method, path)
    assert_error(response, 405, "method_not_allowed")


def test_405_names_the_allowed_method(server: Server) -> None:
    """A 405 carries an Allow header naming the method that works (RFC 9110)."""
    response = server.client().get("/auth/login")
    assert response.status == 405
    assert "POST" in (response.header("Allow") or ""), response.header("Allow")


@pytest.mark.parametrize("field", ["display_name", "password", "email", "phone"])
def test_nul_characters_are_not_5xx(server: Server, field: str) -> None:
    """A NUL character in any field is refused or stored, never a 5xx."""
    body = {"email": random_email(), "password": strong_password(), "display_name": "N"}
    if field == "phone":
        body["phone"] = "+1555\x001234567"
    else:
        body[field] = body[field][:3] + "\x00" + body[field][3:]
    _assert_not_5xx(server.client().post("/auth/register", body))
    login = {"identifier": body["email"], "password": body["password"]}
    _assert_not_5xx(server.client().post("/auth/login", login))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_values = json_values | st.emails().map(str) | st.text(max_size=140)


@FUZZ
@given(
    st.sampled_from(["/auth/register", "/auth/login", "/auth/logout"]),
    st.dictionaries(
        st.sampled_from(["email", "password", "identifier", "phone", "display_name", "x"]),
        field_values,
        max_size=5,
    ),
)
def test_fuzzed_json_bodies_never_5xx(server: Server, route: str, body: dict[str, object]) -> None:
    """Arbitrary JSON objects with contract field names never produce a 5xx."""
    response = server.client().post(route, body)
    _assert_not_5xx(response)


@FUZZ
@given(st.sampled_from(POST_ROUTES), st.binary(max_size=200))
def test_fuzzed_raw_bodies_never_5xx(server: Server, route: str, raw: bytes) -> None:
    """Arbitrary bytes declared as JSON never produce a 5xx."""
    response = server.client().post(route, body=raw, headers=JSON_HEADERS)
    _assert_not_5xx(response)


def _assert_not_5xx(response: Response) -> None:
    """Assert a non-5xx answer, and the JSON envelope when it is an error."""
    assert response.status < 500, response
    if response.status >= 400:
        assert_error(response, response.status, _codes_for(response.status))
    else:
        assert response.json().get("ok") is True


def _codes_for(status: int) -> tuple[str, ...]:
    """Return the error codes allowed for a status."""
    return {
        400: ("invalid_json", "invalid_input", "invalid_email", "weak_password", "invalid_phone"),
        401: ("invalid_credentials",),
        409: ("email_taken", "phone_taken"),
        413: ("body_too_large",),
        429: ("rate_limited",),
    }.get(status, ())


@pytest.mark.parametrize("route", [*BODY_ROUTES, "/deepseek_chat", "/auth/password/forgot"])
def test_deeply_nested_json_is_400(server: Server, route: str) -> None:
    """Thousands of nested brackets (well under the size limit) are a 400, not a 500."""
    raw = b'{"a":' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    response = server.client().post(route, body=raw, headers=JSON_HEADERS)
    assert_error(response, 400, "invalid_json")


def test_negative_content_length_is_4xx(server: Server) -> None:
    """A negative Content-Length never reaches the body reader as a 'read everything'."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest("POST", "/auth/login")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "-1")
        conn.endheaders()
        response = conn.getresponse()
        assert 400 <= response.status < 500, response.status
    finally:
        conn.close()
