"""Pure functions in process, no server, milliseconds each: the request header parser, the
provider body de-chunker and SSE reader, client_ip, configuration parsing, URL helpers and
the cross-site check. (check_body_framing: tests/test_protocol.py; address_key:
tests/test_abuse_limits.py; email, password and signing rules: tests/test_rules_unit.py.)"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

import cloudchat

# -- read_request_headers ---------------------------------------------------------------------


def parse(block: bytes) -> list[tuple[str, str]]:
    """The (name, value) pairs read_request_headers takes from a header block."""
    return list(cloudchat.read_request_headers(io.BytesIO(block)).items())


@pytest.mark.parametrize(
    ("block", "pairs"),
    [
        (b"\r\n", []),
        (b"", []),
        (b"Host: x\r\n\r\n", [("Host", "x")]),
        (b"Host: x\n\n", [("Host", "x")]),
        (b"Host:x\r\nAccept:  */*  \t\r\n\r\n", [("Host", "x"), ("Accept", "*/*")]),
        (b"X-A: 1\r\nX-A: 2\r\n\r\n", [("X-A", "1"), ("X-A", "2")]),
        (b"X-Empty:\r\n\r\n", [("X-Empty", "")]),
        (b"X-Colon: a:b: c\r\n\r\n", [("X-Colon", "a:b: c")]),
        (b"X-Latin: caf\xe9\r\n\r\n", [("X-Latin", "caf\xe9")]),
        (b"X-Nul: a\x00b\r\n\r\n", [("X-Nul", "a b")]),
    ],
    ids=[
        "empty-block",
        "eof",
        "one",
        "bare-lf",
        "optional-whitespace",
        "repeated",
        "empty-value",
        "colon-in-value",
        "latin-1",
        "nul-becomes-space",
    ],
)
def test_header_blocks_that_parse(block: bytes, pairs: list[tuple[str, str]]) -> None:
    """Well-formed blocks give every header in order, values trimmed, NUL as a space."""
    assert parse(block) == pairs


def test_header_block_ends_at_the_blank_line() -> None:
    """The body after the blank line is left in the stream, unread."""
    stream = io.BytesIO(b"Host: x\r\n\r\nX-Body: not a header\r\n")
    headers = cloudchat.read_request_headers(stream)
    assert list(headers.items()) == [("Host", "x")]
    assert stream.read() == b"X-Body: not a header\r\n"


@pytest.mark.parametrize(
    "block",
    [
        b"Host: x\r\n folded\r\n\r\n",
        b"Host: x\r\n\tfolded: too\r\n\r\n",
        b"Content-Length : 33\r\n\r\n",
        b"Content-Length\t: 33\r\n\r\n",
        b" Host: x\r\n\r\n",
        b"X-Cr: a\rb\r\n\r\n",
        b"X-Cr: a\r\r\n\r\n",
        b"no colon at all\r\n\r\n",
        b": no name\r\n\r\n",
        b"X(bad): 1\r\n\r\n",
        b"Host: x",
        b"Host: x\r\nX-Cut: y",
    ],
    ids=[
        "folded",
        "folded-tab",
        "space-before-colon",
        "tab-before-colon",
        "leading-space",
        "bare-cr",
        "cr-before-crlf",
        "no-colon",
        "empty-name",
        "not-a-token",
        "cut-short",
        "cut-short-second",
    ],
)
def test_malformed_header_blocks_are_value_errors(block: bytes) -> None:
    """Folded lines, whitespace before the colon, a bare CR or a cut line: a 400, not a guess."""
    with pytest.raises(ValueError) as caught:
        parse(block)
    assert not isinstance(caught.value, cloudchat.RequestRejected)


@pytest.mark.parametrize(
    "block",
    [
        b"X-Big: " + b"a" * 8200 + b"\r\n\r\n",
        b"".join(b"X-%d: %s\r\n" % (n, b"v" * 8000) for n in range(5)) + b"\r\n",
    ],
    ids=["long-line", "long-block"],
)
def test_oversized_header_blocks_are_431(block: bytes) -> None:
    """A line over 8 KiB or a block over 32 KiB: RequestRejected with status 431."""
    with pytest.raises(cloudchat.RequestRejected) as caught:
        parse(block)
    assert caught.value.status == 431
    assert caught.value.code == "headers_too_large"
    assert caught.value.response().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_a_line_of_exactly_the_limit_is_fine() -> None:
    """8192 bytes with its CRLF is the longest line; the limit is not one byte short."""
    line = b"X-Big: " + b"a" * (8192 - len(b"X-Big: \r\n")) + b"\r\n"
    assert len(line) == 8192
    assert parse(line + b"\r\n") == [("X-Big", "a" * (8192 - 9))]


def test_too_many_headers() -> None:
    """100 headers pass; the 101st is a ValueError (400), not a 431."""
    hundred = b"".join(b"X-%d: v\r\n" % n for n in range(100))
    assert len(parse(hundred + b"\r\n")) == 100
    with pytest.raises(ValueError, match="more than 100 headers") as caught:
        parse(hundred + b"X-100: v\r\n\r\n")
    assert not isinstance(caught.value, cloudchat.RequestRejected)


# -- ResponseBody and ChatStream.events over a real socket ------------------------------------


class Upstream:
    """A socket pair: the test writes a provider's bytes into one end; an HTTPResponse reads
    the other, as the server's provider connection does."""

    def __init__(self) -> None:
        """Open the pair; the reading end times out quickly instead of hanging a test."""
        self.writer, self.reader = socket.socketpair()
        self.reader.settimeout(2)
        self.responses: list[http.client.HTTPResponse] = []

    def send(self, data: bytes) -> None:
        """Bytes from the provider, in one write."""
        self.writer.sendall(data)

    def hang_up(self) -> None:
        """The provider closes its end."""
        self.writer.shutdown(socket.SHUT_WR)

    def response(self, head: bytes) -> http.client.HTTPResponse:
        """Send a status line and headers and return the response, begun."""
        self.send(head)
        response = http.client.HTTPResponse(self.reader)
        response.begin()
        self.responses.append(response)  # alive while read: its end closes the file it reads
        return response

    def close(self) -> None:
        """Close both ends and the responses' files (each holds its socket open)."""
        for response in self.responses:
            response.close()
        self.writer.close()
        self.reader.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A fresh socket pair standing in for a provider connection."""
    pair = Upstream()
    try:
        yield pair
    finally:
        pair.close()


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    """One chunk of chunked transfer coding."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_dechunker_returns_every_chunk_that_arrived_at_once(upstream: Upstream) -> None:
    """Three chunks in one read come back as one piece; the last chunk ends the body."""
    body = cloudchat.ResponseBody(upstream.response(CHUNKED))
    upstream.send(chunk(b"one ") + chunk(b"two ") + chunk(b"three"))
    assert body.read() == b"one two three"
    assert not body.complete
    upstream.send(b"0\r\n\r\n")
    assert body.read() == b""
    assert body.complete and body.reusable


def test_dechunker_waits_for_framing_split_across_reads(upstream: Upstream) -> None:
    """A size line, data and its CRLF split anywhere: only data is returned, in order."""
    body = cloudchat.ResponseBody(upstream.response(CHUNKED))
    upstream.send(b"1")
    upstream.send(b"0\r\n0123")
    assert body.read() == b"0123"
    upstream.send(b"456789abcdef\r")
    assert body.read() == b"456789abcdef"
    upstream.send(b"\n3;ext=1\r\nxyz\r\n0\r\nTrailer: t\r\n")
    assert body.read() == b"xyz"
    assert not body.complete
    upstream.send(b"\r\n")
    assert body.read() == b""
    assert body.complete and body.reusable


def test_bytes_beyond_the_body_make_the_connection_unusable(upstream: Upstream) -> None:
    """The body ends, but more bytes came with it: complete, yet not reusable."""
    body = cloudchat.ResponseBody(upstream.response(CHUNKED))
    upstream.send(chunk(b"a") + b"0\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert body.read() == b"a"
    assert body.read() == b""
    assert body.complete and not body.reusable


@pytest.mark.parametrize(
    ("framing", "error"),
    [
        (b"zz\r\nab\r\n", "bad chunk size line"),
        (b"2\r\nabXY", "not followed by CRLF"),
        (b"1" * 4097, "chunk size line too long"),
        (b"-1\r\n", "bad chunk size line"),
    ],
    ids=["not-hex", "no-crlf-after-data", "size-line-too-long", "negative"],
)
def test_broken_chunk_framing_is_a_value_error(
    upstream: Upstream, framing: bytes, error: str
) -> None:
    """Broken framing is a ValueError, after the data that came before it."""
    body = cloudchat.ResponseBody(upstream.response(CHUNKED))
    upstream.send(chunk(b"good") + framing)
    if framing.startswith(b"2\r\nab"):
        assert body.read() == b"goodab"
    else:
        assert body.read() == b"good"
    with pytest.raises(ValueError, match=error):
        body.read()


def test_chunked_body_cut_by_the_connection_is_a_value_error(upstream: Upstream) -> None:
    """The provider hangs up inside a chunked body: ValueError, not an early end."""
    body = cloudchat.ResponseBody(upstream.response(CHUNKED))
    upstream.send(chunk(b"part"))
    upstream.hang_up()
    assert body.read() == b"part"
    with pytest.raises(ValueError, match="closed inside a chunked body"):
        body.read()
    assert not body.complete


def test_content_length_body(upstream: Upstream) -> None:
    """With Content-Length: what arrived, then b"" once the length is read; reusable."""
    body = cloudchat.ResponseBody(
        upstream.response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    )
    upstream.send(b"01234")
    assert body.read() == b"01234"
    upstream.send(b"56789")
    assert body.read() == b"56789"
    assert body.read() == b""
    assert body.complete and body.reusable


def test_content_length_body_cut_short(upstream: Upstream) -> None:
    """The connection ends before Content-Length bytes: ValueError."""
    body = cloudchat.ResponseBody(
        upstream.response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    )
    upstream.send(b"0123")
    upstream.hang_up()
    assert body.read() == b"0123"
    with pytest.raises(ValueError, match="before the end of the body"):
        body.read()


def test_body_delimited_by_the_connection(upstream: Upstream) -> None:
    """No length, no chunking: the body ends with the connection, which is not reused."""
    body = cloudchat.ResponseBody(
        upstream.response(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    )
    upstream.send(b"all of it")
    upstream.hang_up()
    assert body.read() == b"all of it"
    assert body.read() == b""
    assert body.complete


def event(payload: Any) -> bytes:
    """One SSE event carrying a JSON payload."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def delta(**fields: str) -> bytes:
    """One chat-completion chunk event with the given delta fields."""
    return event({"choices": [{"index": 0, "delta": fields}]})


def chat_stream(upstream: Upstream) -> cloudchat.ChatStream:
    """A ChatStream reading a chunked event stream from the socket pair."""
    response = upstream.response(CHUNKED)
    url = urllib.parse.urlsplit("http://provider.invalid")
    conn = http.client.HTTPConnection("provider.invalid")
    pool = cloudchat.UpstreamPool(1.0, 1.0, 60.0, 4)
    return cloudchat.ChatStream("fake", url, pool, conn, response)


def test_sse_events_in_batches_one_per_read(upstream: Upstream) -> None:
    """Events that arrive together form one batch; comments and unknown fields are skipped."""
    stream = chat_stream(upstream)
    events = stream.events()
    upstream.send(chunk(b": keep-alive\n\n" + delta(content="Hel") + delta(content="lo")))
    assert next(events) == [("text", "Hel"), ("text", "lo")]
    upstream.send(
        chunk(
            b"event: message\nid: 7\n"
            + delta(reasoning_content="hm", content="!")
            + event({"choices": [], "usage": {"total_tokens": 3}})
        )
    )
    assert next(events) == [("reasoning", "hm"), ("text", "!"), ("usage", {"total_tokens": 3})]
    upstream.send(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    assert list(events) == []


def test_sse_event_split_across_reads_and_crlf_lines(upstream: Upstream) -> None:
    """An event (and a UTF-8 character) split across reads waits for its rest; CRLF lines
    and multi-line data are read as the SSE format says."""
    stream = chat_stream(upstream)
    events = stream.events()
    whole = delta(content="é🙂").replace(b"\n", b"\r\n")
    cut = whole.index("🙂".encode()) + 2
    upstream.send(chunk(whole[:cut]))
    upstream.send(chunk(whole[cut:] + b'data: {"choices":\r\ndata: []}\r\n\r\n'))
    assert next(events) == [("text", "é🙂")]
    upstream.send(chunk(delta(content="x") + b"data:[DONE]\n\n"))
    assert next(events) == [("text", "x")]
    with pytest.raises(StopIteration):
        next(events)


@pytest.mark.parametrize(
    ("tail", "error"),
    [
        (b"data: {not json\n\n", "invalid JSON in the stream"),
        (b"data: [1, 2]\n\n", "stream chunk is not an object"),
        (event({"error": {"message": "overloaded"}}), "error in stream"),
    ],
    ids=["invalid-json", "not-an-object", "error-event"],
)
def test_sse_bad_event_after_good_ones(upstream: Upstream, tail: bytes, error: str) -> None:
    """The good events before a bad one are delivered first, then a ProviderError."""
    events = chat_stream(upstream).events()
    upstream.send(chunk(delta(content="kept") + tail))
    assert next(events) == [("text", "kept")]
    with pytest.raises(cloudchat.ProviderError, match=error):
        next(events)


def test_sse_stream_ending_before_done(upstream: Upstream) -> None:
    """A complete body without [DONE], or a connection cut mid-body: ProviderError."""
    events = chat_stream(upstream).events()
    upstream.send(chunk(delta(content="a")) + b"0\r\n\r\n")
    assert next(events) == [("text", "a")]
    with pytest.raises(cloudchat.ProviderError, match=r"stream ended before \[DONE\]"):
        next(events)


def test_sse_stream_cut_by_the_provider(upstream: Upstream) -> None:
    """The provider hangs up inside the chunked body: 'stream broke', the server's fault."""
    events = chat_stream(upstream).events()
    upstream.send(chunk(delta(content="a")))
    upstream.hang_up()
    assert next(events) == [("text", "a")]
    with pytest.raises(cloudchat.ProviderError, match="stream broke") as caught:
        next(events)
    assert "closed inside a chunked body" in str(caught.value)


def test_sse_silent_stream(upstream: Upstream) -> None:
    """No byte within the read timeout: 'stream went silent'."""
    events = chat_stream(upstream).events()
    upstream.reader.settimeout(0.01)
    with pytest.raises(cloudchat.ProviderError, match="stream went silent"):
        next(events)


def test_sse_line_without_end_is_bounded(upstream: Upstream) -> None:
    """More than 1 MiB without a line break is not SSE: ProviderError, not unbounded memory."""
    events = chat_stream(upstream).events()
    flood = threading.Thread(target=upstream.send, args=(chunk(b"x" * (1024 * 1024 + 1)),))
    flood.start()  # more than a socket buffer holds: written while the stream reads it
    try:
        with pytest.raises(cloudchat.ProviderError, match="stream line too long"):
            next(events)
    finally:
        upstream.reader.shutdown(socket.SHUT_RD)
        flood.join(5)


# -- client_ip --------------------------------------------------------------------------------

LOOPBACK = cloudchat.DEFAULT_TRUSTED_PROXIES
PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ffff::/48"))


def environ(peer: str | None, forwarded: str | None = None) -> dict[str, str]:
    """A WSGI environ with REMOTE_ADDR and X-Forwarded-For."""
    env = {} if peer is None else {"REMOTE_ADDR": peer}
    if forwarded is not None:
        env["HTTP_X_FORWARDED_FOR"] = forwarded
    return env


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("203.0.113.5", None, LOOPBACK, "203.0.113.5"),
        ("203.0.113.5", "198.51.100.1", LOOPBACK, "203.0.113.5"),
        ("203.0.113.5", "198.51.100.1", (), "203.0.113.5"),
        ("127.0.0.1", None, LOOPBACK, "127.0.0.1"),
        ("127.0.0.1", "", LOOPBACK, "127.0.0.1"),
        ("127.0.0.1", "198.51.100.1", LOOPBACK, "198.51.100.1"),
        ("127.0.0.1", " 198.51.100.1 ", LOOPBACK, "198.51.100.1"),
        ("127.0.0.1", "1.1.1.1, 198.51.100.1", LOOPBACK, "198.51.100.1"),
        ("10.0.0.2", "1.1.1.1, 198.51.100.1, 10.0.0.7", PROXIES, "198.51.100.1"),
        ("10.0.0.2", "10.0.0.9, 10.0.0.7", PROXIES, "10.0.0.2"),
        ("10.0.0.2", "198.51.100.1,,  ,", PROXIES, "198.51.100.1"),
        ("127.0.0.1", "not-an-ip", LOOPBACK, "127.0.0.1"),
        ("127.0.0.1", "198.51.100.1, not-an-ip", LOOPBACK, "127.0.0.1"),
        ("127.0.0.1", "not-an-ip, 198.51.100.1", LOOPBACK, "198.51.100.1"),
        ("127.0.0.1", "198.51.100.1:8080", LOOPBACK, "127.0.0.1"),
        ("127.0.0.1", "198.51.100.1\x00", LOOPBACK, "127.0.0.1"),
        ("::1", "2001:db8::1", LOOPBACK, "2001:db8::1"),
        ("::1", "2001:DB8:0:0::1", LOOPBACK, "2001:db8::1"),
        ("::1", "[2001:db8::1]", LOOPBACK, "::1"),
        ("2001:db8:ffff::2", "2001:db8:1::5, 2001:db8:ffff::3", PROXIES, "2001:db8:1::5"),
        ("2001:db8::9", "198.51.100.1", PROXIES, "2001:db8::9"),
        ("::ffff:127.0.0.1", "198.51.100.1", LOOPBACK, "::ffff:127.0.0.1"),
        ("127.0.0.1", "127.0.0.1", LOOPBACK, "127.0.0.1"),
        (None, "198.51.100.1", LOOPBACK, "unknown"),
        ("", "198.51.100.1", LOOPBACK, "unknown"),
    ],
    ids=[
        "untrusted-peer",
        "untrusted-peer-forwarded-ignored",
        "nothing-trusted",
        "trusted-peer-no-header",
        "trusted-peer-empty-header",
        "trusted-peer-one-hop",
        "blanks-around",
        "rightmost-untrusted-wins",
        "chain-of-proxies",
        "all-proxies",
        "empty-entries",
        "garbage-only",
        "garbage-at-the-right",
        "garbage-at-the-left",
        "with-port",
        "with-nul",
        "ipv6-client",
        "ipv6-normalised",
        "ipv6-bracketed",
        "ipv6-proxies",
        "untrusted-ipv6-peer",
        "mapped-loopback-not-trusted",
        "forwarded-loopback",
        "no-peer",
        "empty-peer",
    ],
)
def test_client_ip(
    peer: str | None, forwarded: str | None, trusted: tuple[Any, ...], expected: str
) -> None:
    """The peer unless it is a trusted proxy; then the rightmost untrusted forwarded entry,
    and the peer again when that entry is not an address (the chain cannot be trusted)."""
    assert cloudchat.client_ip(environ(peer, forwarded), trusted) == expected


# -- Config.from_env / examine_env ------------------------------------------------------------


def examine(**env: str) -> tuple[cloudchat.Config, list[str], list[str]]:
    """Config.examine_env of the given variables."""
    return cloudchat.Config.examine_env(env)


@pytest.mark.parametrize(
    ("name", "raw", "field", "value"),
    [
        ("PORT", "0", "port", 0),
        ("PORT", "65535", "port", 65535),
        ("PORT", " 8080 ", "port", 8080),
        ("PORT", "", "port", 5000),
        ("PORT", "   ", "port", 5000),
        ("DB_TIMEOUT", "0.1", "db_timeout", 0.1),
        ("DB_TIMEOUT", "120", "db_timeout", 120.0),
        ("MAX_HISTORY", "0", "max_history", 0),
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("FRONTEND_BASE_URL", "https://site.example/app/", "frontend_base_url",
         "https://site.example/app"),
        ("SYSTEM_PROMPT", "  ", "system_prompt", cloudchat.DEFAULT_SYSTEM_PROMPT),
        ("SMTP_PASS", " pass with blanks ", "smtp_pass", " pass with blanks "),
    ],
)  # fmt: skip
def test_values_within_bounds_are_taken(name: str, raw: str, field: str, value: Any) -> None:
    """Bounds are inclusive, blanks are trimmed, a blank value means the default."""
    cfg, problems, unsafe = examine(**{name: raw})
    assert (problems, unsafe) == ([], [])
    assert getattr(cfg, field) == value


MALFORMED = [
    ("PORT", "65536", "PORT=65536 is outside 0..65535"),
    ("PORT", "-1", "PORT=-1 is outside 0..65535"),
    ("PORT", "80.5", "PORT='80.5' is not a whole number"),
    ("PORT", "eighty", "PORT='eighty' is not a whole number"),
    ("DB_TIMEOUT", "0.05", "DB_TIMEOUT=0.05 is outside 0.1..120"),
    ("DB_TIMEOUT", "soon", "DB_TIMEOUT='soon' is not a number of seconds"),
    ("CLOUDCHAT_ENV", "staging", "CLOUDCHAT_ENV='staging' is not one of development, production"),
    ("LOG_LEVEL", "LOUD", "LOG_LEVEL='LOUD' is not one of DEBUG, INFO, WARNING, ERROR"),
    ("COOKIE_SECURE", "maybe", "COOKIE_SECURE='maybe' is not a switch (use 1 or 0)"),
    ("RATE_LOGIN_IP", "10", "RATE_LOGIN_IP='10' is not LIMIT/SECONDS, e.g. 10/600"),
    ("RATE_LOGIN_IP", "0/600", "RATE_LOGIN_IP='0/600' is not LIMIT/SECONDS, e.g. 10/600"),
    ("RATE_LOGIN_IP", "10/0", "RATE_LOGIN_IP='10/0' is not LIMIT/SECONDS, e.g. 10/600"),
    ("RATE_LOGIN_IP", "-1/600", "RATE_LOGIN_IP='-1/600' is not LIMIT/SECONDS, e.g. 10/600"),
    ("FRONTEND_BASE_URL", "ftp://x", "FRONTEND_BASE_URL='ftp://x' is not an http(s) URL"),
    ("FRONTEND_BASE_URL", "https://", "FRONTEND_BASE_URL='https:' is not an http(s) URL"),
    ("TRUSTED_PROXIES", "10.0.0.0/8, nope", "TRUSTED_PROXIES: 'nope' is not an address"),
    ("ALLOWED_ORIGINS", "https://ok.example, null", "ALLOWED_ORIGINS: 'null' is not an origin"),
    ("CHAT_FALLBACK", "claude", "CHAT_FALLBACK names 'claude'"),
    ("CHAT_FALLBACK", "openai", "chat provider openai is chosen but OPENAI_API_KEY is unset"),
]
# The Config field each variable above sets (ALLOWED_ORIGINS and the rest keep what parses).
FIELDS = {
    "PORT": "port",
    "DB_TIMEOUT": "db_timeout",
    "CLOUDCHAT_ENV": "env",
    "LOG_LEVEL": "log_level",
    "COOKIE_SECURE": "cookie_secure",
    "RATE_LOGIN_IP": "rate_login_ip",
    "FRONTEND_BASE_URL": "frontend_base_url",
}


@pytest.mark.parametrize(("name", "raw", "problem"), MALFORMED)
def test_malformed_values_are_problems_and_defaults(name: str, raw: str, problem: str) -> None:
    """A malformed value is one problem naming the variable, and the default is kept."""
    cfg, problems, _ = examine(**{name: raw})
    assert len(problems) == 1 and problems[0].startswith(problem), problems
    if name in FIELDS:
        assert getattr(cfg, FIELDS[name]) == getattr(cloudchat.Config(), FIELDS[name])
    with pytest.raises(cloudchat.ConfigError) as caught:
        cloudchat.Config.from_env({name: raw})
    assert not isinstance(caught.value, cloudchat.UnsafeConfigError)
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        *[("1", True), ("true", True), ("YES", True), ("On", True)],
        *[("0", False), ("false", False), ("No", False), ("OFF", False)],
    ],
)
def test_flags(raw: str, value: bool) -> None:
    """Every spelling of a switch, in any case."""
    cfg, problems, _ = examine(COOKIE_SECURE=raw, PWRESET_REVOKE_SESSIONS=raw)
    assert problems == []
    assert cfg.cookie_secure is value and cfg.pwreset_revoke_sessions is value


@pytest.mark.parametrize(
    ("raw", "rate"),
    [
        ("10/600", (10, 600)),
        ("1/1", (1, 1)),
        (" 5 / 60 ", (5, 60)),
        ("100000/3600", (100000, 3600)),
    ],
)
def test_rates(raw: str, rate: tuple[int, int]) -> None:
    """LIMIT/SECONDS, blanks allowed around the slash."""
    cfg, problems, _ = examine(RATE_CHAT_IP=raw)
    assert problems == []
    assert cfg.rate_chat_ip == cloudchat.RateLimit(*rate)


def test_every_problem_is_collected() -> None:
    """Several malformed settings: every one reported at once, in one ConfigError."""
    env = {
        "PORT": "99999",
        "DB_TIMEOUT": "x",
        "COOKIE_SECURE": "perhaps",
        "RATE_LOGIN_IP": "ten",
        "TRUSTED_PROXIES": "bad",
        "ARGON2_MEMORY_KIB": "8",
        "ARGON2_PARALLELISM": "2",
        "SECRET_KEY": "short",
        "DATABASE_URL": "mysql://u:pw@db/x",
        "REDIS_URL": "http://:pw@cache",
    }
    _, problems, unsafe = cloudchat.Config.examine_env(env)
    assert unsafe == []
    expected = [
        "PORT=99999",
        "DB_TIMEOUT='x'",
        "COOKIE_SECURE='perhaps'",
        "RATE_LOGIN_IP='ten'",
        "TRUSTED_PROXIES: 'bad'",
        "ARGON2_MEMORY_KIB must be at least 8 x ARGON2_PARALLELISM",
        "SECRET_KEY is shorter than 32 characters",
        "DATABASE_URL='mysql://***@db/x' is not PostgreSQL",
        "REDIS_URL='http://***@cache' is not a Redis URL",
    ]
    assert len(problems) == len(expected), problems
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)
    text = "; ".join(problems)
    assert ":pw@" not in text
    with pytest.raises(cloudchat.ConfigError) as caught:
        cloudchat.Config.from_env(env)
    assert str(caught.value) == text
    missing_folder = {"CLOUDCHAT_DB_PATH": "/no/such/folder/cloudchat.db", "PORT": "x"}
    _, problems, _ = cloudchat.Config.examine_env(missing_folder)
    assert len(problems) == 2, problems
    assert problems[1].startswith("CLOUDCHAT_DB_PATH='/no/such/folder/cloudchat.db': the folder")


def test_redis_url_from_parts() -> None:
    """REDIS_HOST/PORT/DB/PASSWORD make a URL (password quoted); REDIS_URL wins over them."""
    cfg, problems, _ = examine(
        REDIS_HOST="cache", REDIS_PORT="6380", REDIS_DB="3", REDIS_PASSWORD="p@ss:w/rd"
    )
    assert problems == []
    assert cfg.redis_url == "redis://:p%40ss%3Aw%2Frd@cache:6380/3"
    cfg, _, _ = examine(REDIS_URL="redis://other:6379/1", REDIS_HOST="cache")
    assert cfg.redis_url == "redis://other:6379/1"
    assert examine(REDIS_PORT="6380")[0].redis_url == ""


def test_trusted_proxies_and_origins_are_normalised() -> None:
    """Addresses become networks (host bits allowed); origins lose case and default ports;
    an empty TRUSTED_PROXIES trusts nobody."""
    cfg, problems, _ = examine(
        TRUSTED_PROXIES="10.1.2.3/8, ::1, 192.168.0.1",
        ALLOWED_ORIGINS="HTTPS://App.Example:443, http://x.example:8080/path, ,",
    )
    assert problems == []
    assert [str(n) for n in cfg.trusted_proxies] == ["10.0.0.0/8", "::1/128", "192.168.0.1/32"]
    assert cfg.allowed_origins == ("https://app.example", "http://x.example:8080")
    assert examine(TRUSTED_PROXIES="")[0].trusted_proxies == ()


def test_chat_providers_in_order() -> None:
    """The first provider with a key, then CHAT_FALLBACK's in order, each once."""
    cfg, problems, _ = examine(
        OPENAI_API_KEY="sk-o",
        DASHSCOPE_API_KEY="sk-d",
        CHAT_FALLBACK="dashscope, openai, DASHSCOPE",
    )
    assert problems == []
    assert [p.name for p in cfg.chat_providers] == ["openai", "dashscope"]
    cfg, problems, _ = examine(
        DEEPSEEK_API_KEY="sk-x", CHAT_PROVIDER="deepseek", DEEPSEEK_BASE_URL="http://127.0.0.1:9/"
    )
    assert problems == []
    (provider,) = cfg.chat_providers
    assert (provider.base_url, provider.model) == ("http://127.0.0.1:9", "deepseek-v4-flash")
    assert "sk-x" not in repr(cfg)
    assert examine()[0].chat_providers == ()


def test_mail_sender_name_falls_back_to_the_site_name() -> None:
    """MAIL_SENDER_NAME unset takes SITE_NAME; set, it is its own."""
    assert examine(SITE_NAME="Acme")[0].mail_sender_name == "Acme"
    assert examine(SITE_NAME="Acme", MAIL_SENDER_NAME="Support")[0].mail_sender_name == "Support"


PRODUCTION_OK = {
    "CLOUDCHAT_ENV": "production",
    "COOKIE_SECURE": "1",
    "DATABASE_URL": "postgresql://cc:pw@127.0.0.1/cc",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "SECRET_KEY": "a" * 64,
    "SMTP_HOST": "smtp.example.com",
    "DEEPSEEK_API_KEY": "sk-real",
    "FRONTEND_BASE_URL": "https://chat.example.com",
}


def test_a_safe_production_configuration() -> None:
    """Every production rule met: no problem, from_env returns the configuration."""
    cfg, problems, unsafe = cloudchat.Config.examine_env(PRODUCTION_OK)
    assert (problems, unsafe) == ([], [])
    assert cfg.production
    assert cloudchat.Config.examine_env({**PRODUCTION_OK, "CLOUDCHAT_ENV": "Production"})[1:] == (
        [],
        [],
    )
    assert cloudchat.Config.from_env(PRODUCTION_OK) == cfg


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"COOKIE_SECURE": "0"}, "COOKIE_SECURE is off"),
        ({"DEBUG_RETURN_RESET_TOKEN": "1"}, "DEBUG_RETURN_RESET_TOKEN=1 hands reset tokens"),
        ({"DATABASE_URL": None}, "DATABASE_URL is unset"),
        ({"SECRET_KEY": None}, "SECRET_KEY is unset"),
        ({"REDIS_URL": None}, "Redis is not configured"),
        ({"HOST": "0.0.0.0"}, "HOST=0.0.0.0 listens on every interface"),
        ({"TRUSTED_PROXIES": "0.0.0.0/0"}, "TRUSTED_PROXIES includes 0.0.0.0/0"),
        ({"TRUSTED_PROXIES": "::/8"}, "TRUSTED_PROXIES includes ::/8"),
        ({"DEEPSEEK_BASE_URL": "http://api.example"}, "DEEPSEEK_BASE_URL is plain http"),
        ({"SMTP_HOST": None}, "SMTP_HOST is unset"),
        ({"DEEPSEEK_API_KEY": None}, "no model provider key"),
        ({"FRONTEND_BASE_URL": "http://chat.example.com"}, "FRONTEND_BASE_URL is not https"),
        ({"SMTP_TLS": "0"}, "SMTP_TLS=0 sends mail and the SMTP password in clear"),
        ({"ARGON2_MEMORY_KIB": "19455"}, "Argon2 parameters are below OWASP's minimum"),
        ({"ARGON2_TIME_COST": "1"}, "Argon2 parameters are below OWASP's minimum"),
        ({"SITE_NAME": "CHANGE_ME"}, "SITE_NAME still holds a CHANGE_ME placeholder"),
    ],
)
def test_each_production_problem(change: dict[str, str | None], problem: str) -> None:
    """One unsafe setting in production: exactly that problem, as an UnsafeConfigError."""
    env = {k: v for k, v in {**PRODUCTION_OK, **change}.items() if v is not None}
    _, problems, unsafe = cloudchat.Config.examine_env(env)
    assert problems == []
    assert len(unsafe) == 1 and unsafe[0].startswith(problem), unsafe
    with pytest.raises(cloudchat.UnsafeConfigError):
        cloudchat.Config.from_env(env)


@pytest.mark.parametrize(
    "change",
    [
        {"DEEPSEEK_BASE_URL": "http://127.0.0.1:8000"},
        {"DEEPSEEK_BASE_URL": "http://localhost:8000"},
        {"SMTP_TLS": "0", "SMTP_PORT": "465"},
        {"SMTP_TLS": "0", "SMTP_HOST": "127.0.0.1"},
        {"TRUSTED_PROXIES": "10.0.0.0/8, fd00::/16"},
    ],
)
def test_production_exceptions(change: dict[str, str]) -> None:
    """Plain http or SMTP without STARTTLS on loopback, implicit TLS, private proxy ranges."""
    assert cloudchat.Config.examine_env({**PRODUCTION_OK, **change})[1:] == ([], [])


def test_production_problems_are_not_checked_in_development() -> None:
    """The same unsafe settings in development are fine; malformed ones count in both."""
    assert cloudchat.Config.examine_env({"COOKIE_SECURE": "0"})[1:] == ([], [])
    env = {"CLOUDCHAT_ENV": "production", "PORT": "x"}
    _, problems, unsafe = cloudchat.Config.examine_env(env)
    assert problems == ["PORT='x' is not a whole number"]
    assert unsafe
    with pytest.raises(cloudchat.ConfigError) as caught:
        cloudchat.Config.from_env(env)
    assert not isinstance(caught.value, cloudchat.UnsafeConfigError)


# -- redact_url, web_origin -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("postgresql://u:secret@db:5432/x", "postgresql://***@db:5432/x"),
        ("redis://:secret@cache:6379/0", "redis://***@cache:6379/0"),
        ("rediss://user@cache", "rediss://***@cache"),
        ("postgresql://db/x", "postgresql://db/x"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("dbname=x password=secret", "dbname=x password=secret"),
        (
            "a postgres://u:p@h/x and redis://:q@r/0 in one message",
            "a postgres://***@h/x and redis://***@r/0 in one message",
        ),
        ("connect to redis://:pw@host failed: x@y", "connect to redis://***@host failed: x@y"),
        ("https://u:p@h/path?next=a@b", "https://***@h/path?next=a@b"),
        ("", ""),
    ],
)
def test_redact_url(text: str, redacted: str) -> None:
    """The user and password of every URL become ***; nothing else changes."""
    assert cloudchat.redact_url(text) == redacted


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://Example.COM", "https://example.com"),
        ("https://example.com:443/path?q=1", "https://example.com"),
        ("http://example.com:80", "http://example.com"),
        ("http://example.com:443", "http://example.com:443"),
        ("https://example.com:8443", "https://example.com:8443"),
        ("  https://example.com/  ", "https://example.com"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("http://[2001:DB8::1]", "http://[2001:db8::1]"),
        ("http://u:p@example.com", "http://example.com"),
        ("null", None),
        ("", None),
        ("ftp://example.com", None),
        ("https://", None),
        ("https://example.com:99999", None),
        ("https://example.com:port", None),
        ("example.com", None),
        ("javascript:alert(1)", None),
    ],
)
def test_web_origin(url: str, origin: str | None) -> None:
    """scheme://host[:port], lower-case, without the default port; None for no origin."""
    assert cloudchat.web_origin(url) == origin


# -- cross_site_refusal -----------------------------------------------------------------------

SITE = frozenset({"https://site.example", "https://app.example:8443"})


def request(method: str = "POST", **headers: str) -> dict[str, str]:
    """A WSGI environ from 127.0.0.1 to Host 127.0.0.1:5000 with the given HTTP_* headers."""
    env = {
        "REQUEST_METHOD": method,
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:5000",
        "wsgi.url_scheme": "http",
    }
    env.update({f"HTTP_{name.upper()}": value for name, value in headers.items()})
    return env


@pytest.mark.parametrize(
    ("env", "refused"),
    [
        (request(), False),
        (request(sec_fetch_site="same-origin"), False),
        (request(sec_fetch_site="same-site"), False),
        (request(sec_fetch_site="none"), False),
        (request(sec_fetch_site="Cross-Site"), True),
        (request(origin="https://evil.example"), True),
        (request(origin="null"), True),
        (request(origin="not a url"), True),
        (request(origin="https://site.example"), False),
        (request(origin="HTTPS://SITE.example:443"), False),
        (request(origin="https://app.example:8443"), False),
        (request(origin="https://app.example"), True),
        (request(origin="https://site.example", sec_fetch_site="cross-site"), True),
        (request(origin="http://127.0.0.1:5000"), False),
        (request(origin="http://127.0.0.1:5001"), True),
        (request(origin="https://127.0.0.1:5000"), True),
        (request(origin="https://127.0.0.1:5000", x_forwarded_proto="https"), False),
        (request(origin="https://127.0.0.1:5000", x_forwarded_proto="ftp"), True),
        (request("PUT", origin="https://evil.example"), True),
        (request("PATCH", origin="https://evil.example"), True),
        (request("DELETE", sec_fetch_site="cross-site"), True),
        (request("GET", origin="https://evil.example", sec_fetch_site="cross-site"), False),
        (request("HEAD", origin="null"), False),
        (request("OPTIONS", origin="https://evil.example"), False),
    ],
    ids=[
        "curl",
        "same-origin",
        "same-site",
        "user-typed",
        "cross-site-any-case",
        "foreign-origin",
        "null-origin",
        "garbage-origin",
        "site",
        "site-default-port",
        "allowed-origin",
        "allowed-host-other-port",
        "site-origin-but-cross-site",
        "own-origin",
        "own-host-other-port",
        "own-host-other-scheme",
        "own-https-behind-trusted-proxy",
        "forwarded-proto-garbage",
        "put",
        "patch",
        "delete",
        "get",
        "head",
        "options",
    ],
)
def test_cross_site_refusal(env: dict[str, str], refused: bool) -> None:
    """State-changing requests from another site are refused; safe methods never are."""
    assert cloudchat.cross_site_refusal(env, cloudchat.Config(), SITE) is refused


def test_forwarded_proto_counts_only_from_a_trusted_proxy() -> None:
    """X-Forwarded-Proto from an untrusted peer does not make its https origin our own."""
    env = {
        **request(origin="https://127.0.0.1:5000", x_forwarded_proto="https"),
        "REMOTE_ADDR": "203.0.113.9",
    }
    assert cloudchat.cross_site_refusal(env, cloudchat.Config(), SITE) is True
    nobody = cloudchat.Config(trusted_proxies=())
    env["REMOTE_ADDR"] = "127.0.0.1"
    assert cloudchat.cross_site_refusal(env, nobody, SITE) is True
    assert cloudchat.cross_site_refusal(env, cloudchat.Config(), SITE) is False


def test_turn_gate_lets_a_ready_request_in_between_a_burst_of_set_ups() -> None:
    """40 chat set-ups of 2 ms of CPU each arrive at once: a turn of the loop takes those
    that start within its 5 ms, in arrival order, and a request whose socket is ready gets
    its turn after a few of them, not after all 40."""
    import gevent
    import gevent.socket

    gate = cloudchat.TurnGate(0.005)
    passed: list[int] = []
    seen_by_probe: list[int] = []

    def set_up(number: int) -> None:
        gate.wait_turn()
        passed.append(number)
        busy_until = time.perf_counter() + 0.002
        while time.perf_counter() < busy_until:
            pass

    def probe(sock: socket.socket) -> None:
        gevent.socket.wait_read(sock.fileno(), timeout=5)
        seen_by_probe.append(len(passed))

    reader, writer = socket.socketpair()
    try:
        writer.send(b"x")  # the probe's request has arrived
        burst = [gevent.spawn(set_up, number) for number in range(40)]
        prober = gevent.spawn(probe, reader)
        gevent.joinall([*burst, prober], timeout=10, raise_error=True)
    finally:
        reader.close()
        writer.close()
    assert passed == list(range(40))  # every one, first come first served
    assert seen_by_probe and seen_by_probe[0] <= 9, seen_by_probe
    assert not gate.queued


def test_turn_gate_serves_set_ups_under_way_before_new_ones() -> None:
    """A handshake's next step (going on) passes before chats that have not begun: each
    chat reaches its first token as soon as it can, instead of every handshake waiting
    behind every other chat's start."""
    import gevent

    gate = cloudchat.TurnGate(0.0)  # one a turn
    order: list[str] = []

    def step(name: str, going_on: bool) -> None:
        gate.wait_turn(going_on=going_on)
        order.append(name)

    first = gevent.spawn(step, "first", False)  # passes: the turn's one
    news = [gevent.spawn(step, f"new{n}", False) for n in range(3)]
    going = gevent.spawn(step, "handshake", True)
    gevent.joinall([first, *news, going], timeout=10, raise_error=True)
    assert order == ["first", "handshake", "new0", "new1", "new2"], order
