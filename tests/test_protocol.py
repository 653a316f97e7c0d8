"""Issue 13: request framing (RFC 9112), header memory, and the headers on every answer."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

import cloudchat
from tests.conftest import shared_server
from tests.helpers import HIGH_LIMITS, Server, logged, register_and_login

HIDDEN = b"GET /test HTTP/1.1\r\nHost: x\r\nX-Hidden: 1\r\n\r\n"


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One embedded server for the module: framing is the HTTP layer's, not storage's."""
    yield from shared_server(request, tmp_path_factory, HIGH_LIMITS, setup="embedded")


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; everything answered until the server closes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(raw)
        sock.settimeout(timeout)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return data


@pytest.mark.parametrize(
    ("framing", "status"),
    [
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"400"),
        (b"Transfer-Encoding: gzip, chunked\r\n", b"501"),
        (b"Transfer-Encoding: identity\r\n", b"501"),
        (b"Transfer-Encoding: \x0bchunked\r\n", b"400"),
        (b"Transfer-Encoding: chunked, \r\n", b"400"),
        (b"Content-Length: +2\r\n", b"400"),
        (b"Content-Length: 0_2\r\n", b"400"),
        (b"Content-Length: \x0b2\r\n", b"400"),
        (b"Content-Length: 2\r\nContent-Length: 2\r\n", b"400"),
        (b"Content-Length: \xb2\r\n", b"400"),  # a Latin-1 superscript two: isdigit() says yes
    ],
    ids=[
        "two-chunked",
        "gzip-chunked",
        "identity",
        "vt-chunked",
        "chunked-comma",
        "plus-length",
        "underscore-length",
        "vt-length",
        "same-length-twice",
        "superscript-length",
    ],
)
def test_ambiguous_body_framing_is_refused(server: Server, framing: bytes, status: bytes) -> None:
    """Point 2: only one `chunked` or one digits-only Content-Length frames a body; the rest
    is refused and the connection closes, so a request hidden in the body is never read."""
    answer = exchange(
        server.port,
        b"POST /auth/logout HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + framing
        + b"\r\n{}"
        + HIDDEN,
    )
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"Connection: close" in answer or b"connection: close" in answer.lower(), answer


def test_plain_chunked_and_content_length_still_work(server: Server) -> None:
    """Point 2: `Transfer-Encoding: Chunked` (any case) and a plain Content-Length are read."""
    chunked = exchange(
        server.port,
        b"POST /auth/logout HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: Chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    assert chunked.startswith(b"HTTP/1.1 200"), chunked[:300]
    sized = exchange(
        server.port,
        b"POST /auth/logout HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    assert sized.startswith(b"HTTP/1.1 200"), sized[:300]


@pytest.mark.parametrize(
    ("lines", "size", "status"),
    [(3, 7000, b"200"), (5, 7000, b"431"), (1, 9000, b"431"), (90, 60, b"200")],
    ids=["21k-in-3-lines", "35k-in-5-lines", "one-9k-line", "90-short-lines"],
)
def test_header_block_is_capped(server: Server, lines: int, size: int, status: bytes) -> None:
    """Point 3: 8 KiB a line and 32 KiB in all, as nginx; beyond, a 431 in the JSON envelope
    and the connection closes (99 lines of 64 KiB held 6 MiB per connection before)."""
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"a" * size) for n in range(lines))
    answer = exchange(
        server.port, b"GET /test HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:300]
    if status == b"431":
        assert b'"code":"headers_too_large"' in answer, answer


def test_refused_framing_is_an_info_line_without_traceback(server: Server) -> None:
    """Point 2: a client's bad framing is its error: an INFO line, never a traceback."""
    since = len(server.logs)
    exchange(
        server.port,
        b"POST /test HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: br\r\n\r\n",
    )
    line = logged(server, "Transfer-Encoding", since=since)[-1]
    assert " INFO " in line, line
    assert "Traceback" not in server.log_text()


def test_check_body_framing_unit() -> None:
    """Point 2, in-process: the rule itself."""
    cloudchat.check_body_framing(None, None)
    cloudchat.check_body_framing(["12"], None)
    cloudchat.check_body_framing(None, ["chunked"])
    cloudchat.check_body_framing(None, ["CHUNKED"])
    for lengths, codings in (
        (["1", "1"], None),
        (["-1"], None),
        ([" 1"], None),
        (["1"], ["chunked"]),
        (None, ["chunked", "chunked"]),
        (None, ["chunked;x"]),
    ):
        with pytest.raises(ValueError):
            cloudchat.check_body_framing(lengths, codings)
    with pytest.raises(cloudchat.RequestRejected) as refused:
        cloudchat.check_body_framing(None, ["gzip"])
    assert refused.value.status == 501


def test_logged_in_answers_are_unchanged(server: Server) -> None:
    """The strict reading leaves an ordinary browser request alone."""
    client, _, _ = register_and_login(server)
    assert client.me().status == 200


def test_every_answer_has_nosniff_and_data_answers_a_csp(server: Server) -> None:
    """Point 5: nosniff on every answer; JSON and chat answers also a CSP that loads and frames
    nothing; chat answers no-store, errors included (a chat echoing <script> is never HTML)."""
    client = server.client()
    answers = {
        "chat-200": client.post("/deepseek_chat", {"message": "<script>alert(1)</script>"}),
        "chat-400": client.post("/deepseek_chat", {"message": ""}),
        "reset-chat": client.post("/reset_chat"),
        "test": client.get("/test"),
        "404": client.get("/nowhere/<script>"),
        "405": client.get("/deepseek_chat"),
        "auth-401": client.me(),
    }
    csp = "default-src 'none'; frame-ancestors 'none'"
    for name, response in answers.items():
        assert response.header("X-Content-Type-Options") == "nosniff", (name, response.headers)
        assert response.header("Content-Security-Policy") == csp, (name, response.headers)
        if name.startswith(("chat", "reset")):
            assert response.header("Cache-Control") == "no-store", (name, response.headers)
    assert b"<script>" in answers["chat-200"].body
    assert answers["chat-200"].header("Content-Type") == "application/x-ndjson"


def test_refusals_before_the_app_carry_nosniff(server: Server) -> None:
    """Point 5: the 431 and 501 written before the app runs carry nosniff too."""
    big = exchange(
        server.port, b"GET /test HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    )
    coding = exchange(
        server.port, b"POST /test HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
    )
    for answer in (big, coding):
        assert b"\r\nX-Content-Type-Options: nosniff\r\n" in answer, answer[:300]


@pytest.fixture(scope="module")
def origins_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server whose site is https://site.example and which also trusts one other origin."""
    overrides = {
        **HIGH_LIMITS,
        "FRONTEND_BASE_URL": "https://site.example",
        "ALLOWED_ORIGINS": "https://app.example:8443",
    }
    yield from shared_server(request, tmp_path_factory, overrides, setup="embedded")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),
        ({"Sec-Fetch-Site": "same-origin"}, 200),
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Origin": "https://site.example"}, 200),
        ({"Origin": "https://SITE.example:443"}, 200),
        ({"Origin": "https://app.example:8443"}, 200),
        ({"Origin": "https://app.example"}, 403),
        ({"Origin": "https://site.example", "Sec-Fetch-Site": "cross-site"}, 403),
    ],
    ids=[
        "curl",
        "same-origin",
        "cross-site",
        "foreign-origin",
        "null-origin",
        "site",
        "site-default-port",
        "allowed-origin",
        "allowed-host-other-port",
        "site-origin-but-cross-site",
    ],
)
def test_cross_site_state_changes_are_refused(
    origins_server: Server, headers: dict[str, str], status: int
) -> None:
    """Point 4: a state-changing request from another site gets 403 cross_site."""
    response = origins_server.client().post("/auth/logout", {}, headers=headers)
    assert response.status == status, response
    if status == 403:
        assert response.json()["code"] == "cross_site"
        assert response.header("X-Content-Type-Options") == "nosniff"


def test_own_origin_and_safe_methods_pass(origins_server: Server) -> None:
    """Point 4: the server's own origin may post; a GET from anywhere is not refused."""
    own = f"http://127.0.0.1:{origins_server.port}"
    client = origins_server.client()
    assert client.post("/auth/logout", {}, headers={"Origin": own}).status == 200
    assert client.get("/test", headers={"Origin": "https://evil.example"}).status == 200


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (None, b'{"identifier": "a@example.com", "password": "xxxxxxxxx"}'),
        ("text/plain", b'{"identifier": "a@example.com", "password": "xxxxxxxxx"}'),
        ("application/x-www-form-urlencoded", b"identifier=a%40example.com&password=x"),
    ],
    ids=["no-content-type", "text-plain", "form"],
)
@pytest.mark.parametrize("path", ["/auth/login", "/auth/logout", "/deepseek_chat"])
def test_a_body_must_be_declared_json(
    server: Server, path: str, content_type: str | None, body: bytes
) -> None:
    """Point 4: a body without a JSON Content-Type is a 415 everywhere, logout included
    (a no-cors fetch with a Blob body sends none and needs no preflight)."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = server.client().post(path, body=body, headers=headers)
    assert response.status == 415, response
    assert response.json()["code"] == "unsupported_media_type"


def test_bodyless_post_without_content_type_still_works(server: Server) -> None:
    """Point 4: the curl examples post without a body or a Content-Type."""
    assert server.client().post("/auth/logout").status == 200
    assert server.client().post("/reset_chat").status == 200
