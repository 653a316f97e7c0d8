"""The streaming chat proxy (/deepseek_chat, /reset_chat) against a fake provider on loopback."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import SETUPS, ServerFactory, shared_server
from tests.fakeprovider import DEFAULT_USAGE, FakeProvider, Recorded, Reply, echo_text
from tests.helpers import (
    HIGH_LIMITS,
    Client,
    Response,
    Server,
    assert_error,
    free_port,
    logged,
    parse_set_cookie,
    random_email,
    random_hex,
    strong_password,
    wait_until,
)
from tests.hostile_net import server_stats

CHAT = "/deepseek_chat"
RESET = "/reset_chat"
KEY = "sk-test-deepseek-0123"
SYSTEM = "You are a helpful assistant."
DEFAULT_MODEL = "deepseek-v4-flash"
MAX_HISTORY = 3
READ_TIMEOUT = 1.0
STREAM_TIMEOUT = 10.0
HIGH_CHAT = {"RATE_CHAT_VISITOR": "100000/60", "RATE_CHAT_IP": "100000/60"}
# Deltas that break naive framing: multi-byte characters, an emoji, a newline, quotes.
AWKWARD = ["你好", "\uff0c世界", " café ", "é", "🙂👍", "\n", 'line2 "quoted" \\ back', " end"]


def chat_env(provider: FakeProvider, **extra: str) -> dict[str, str | None]:
    """Settings of a server whose deepseek provider is the fake, with limits out of the way."""
    return {
        **HIGH_LIMITS,
        **HIGH_CHAT,
        "DEEPSEEK_API_KEY": KEY,
        "DEEPSEEK_BASE_URL": provider.url(),
        "CHAT_READ_TIMEOUT": str(READ_TIMEOUT),
        "CHAT_CONNECT_TIMEOUT": "1",
        "MAX_HISTORY": str(MAX_HISTORY),
        **extra,
    }


@pytest.fixture(scope="module", params=SETUPS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, provider: FakeProvider
) -> Iterator[Server]:
    """A server per setup that chats with the fake provider (where storage matters)."""
    yield from shared_server(request, tmp_path_factory, chat_env(provider))


@pytest.fixture(scope="module")
def embedded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, provider: FakeProvider
) -> Iterator[Server]:
    """One SQLite/in-memory server that chats with the fake (where storage does not matter)."""
    yield from shared_server(request, tmp_path_factory, chat_env(provider), "embedded")


# -- a streaming client ---------------------------------------------------------------------


@dataclass
class Chat:
    """A finished /deepseek_chat answer: the HTTP answer and its NDJSON lines."""

    response: Response
    lines: list[dict[str, Any]]

    @property
    def status(self) -> int:
        """The HTTP status."""
        return self.response.status

    @property
    def headers(self) -> http.client.HTTPMessage:
        """The HTTP headers."""
        return self.response.headers

    @property
    def body(self) -> bytes:
        """The body as it came."""
        return self.response.body

    def header(self, name: str) -> str | None:
        """One header."""
        return self.response.header(name)

    def json(self) -> Any:
        """The body as JSON (an error answer)."""
        return self.response.json()

    @property
    def text(self) -> str:
        """The concatenated `text` of every line, as the browser shows it."""
        return "".join(line["text"] for line in self.lines if "text" in line)

    @property
    def texts(self) -> list[str]:
        """The non-empty `text` values, one per line."""
        return [line["text"] for line in self.lines if line.get("text")]

    @property
    def reasoning(self) -> str:
        """The concatenated `reasoning` of every line."""
        return "".join(line["reasoning"] for line in self.lines if "reasoning" in line)


class ChatStream:
    """One POST /deepseek_chat on its own connection, read line by line as it streams."""

    def __init__(
        self,
        server: Server,
        client: Client,
        message: Any = None,
        *,
        body: Any = None,
        raw: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = STREAM_TIMEOUT,
    ) -> None:
        """Send the request and read the status and headers; cc_app goes to the client's jar."""
        if raw is None:
            raw = json.dumps({"message": message} if body is None else body).encode("utf-8")
        send = {"Content-Type": "application/json", **client.headers, **(headers or {})}
        if client.cookies:
            send["Cookie"] = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        self.started = time.monotonic()
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        self.conn.request("POST", CHAT, body=raw, headers=send)
        self.sock: socket.socket | None = self.conn.sock
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = self.response.msg
        self.lines: list[dict[str, Any]] = []
        self.raw = b""
        for name, value, attrs in [
            parse_set_cookie(h) for h in self.headers.get_all("Set-Cookie") or []
        ]:
            if attrs.get("max-age") == "0" or value == "":
                client.cookies.pop(name, None)
            else:
                client.cookies[name] = value

    def next_line(self) -> dict[str, Any] | None:
        """The next NDJSON object, or None at the end of the body."""
        raw = self.response.readline()
        if not raw:
            return None
        self.raw += raw
        assert raw.endswith(b"\n"), f"line without its newline at the end of the body: {raw!r}"
        line = json.loads(raw.decode("utf-8"))
        assert isinstance(line, dict), raw
        self.lines.append(line)
        return line

    def next_text(self) -> str:
        """Read up to the next line with non-empty text and return that text."""
        while True:
            line = self.next_line()
            assert line is not None, f"body ended before any text: {self.lines}"
            if line.get("text"):
                return str(line["text"])

    def finish(self) -> Chat:
        """Read the rest of the answer."""
        if self.status == 200:
            while self.next_line() is not None:
                pass
            body = self.raw
        else:
            body = self.response.read()
        elapsed = time.monotonic() - self.started
        return Chat(Response(self.status, self.headers, body, elapsed), self.lines)

    def close(self) -> None:
        """Close the connection at once (as a browser tab that goes away)."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.response.close()
        self.conn.close()

    def __enter__(self) -> ChatStream:
        """Use as a context manager."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close on the way out."""
        self.close()


def chat(server: Server, client: Client, message: Any = None, **kwargs: Any) -> Chat:
    """Send one chat request and read the whole answer."""
    with ChatStream(server, client, message, **kwargs) as stream:
        return stream.finish()


def assert_streamed(result: Chat, text: str) -> None:
    """A complete answer: 200, NDJSON, the text, and a final done line."""
    assert result.status == 200, result.response
    content_type = result.response.header("Content-Type") or ""
    assert content_type.startswith("application/x-ndjson"), content_type
    assert result.lines, "no line in a 200 answer"
    assert not [line for line in result.lines if "error" in line], result.lines
    assert result.lines[-1].get("done") is True, result.lines
    assert [line for line in result.lines if line.get("done")] == [result.lines[-1]], result.lines
    assert result.text == text, result.lines


def assert_failed_mid_stream(result: Chat, text_so_far: str) -> None:
    """A 200 answer cut short: the text sent so far, then an error line and no done line."""
    assert result.status == 200, result.response
    assert result.lines, "no line at all"
    last = result.lines[-1]
    assert isinstance(last.get("error"), str) and last["error"].strip(), result.lines
    assert not [line for line in result.lines if line.get("done")], result.lines
    assert result.text == text_so_far, result.lines


def turns(request: Recorded) -> list[tuple[str, str]]:
    """The (role, content) pairs a request carried; never a reasoning_content field."""
    for message in request.messages:
        assert "reasoning_content" not in message, message
    return request.turns()


def history(*rounds: str, then: str, system: str = SYSTEM) -> list[tuple[str, str]]:
    """The messages expected for `then` after these rounds, each answered by the fake's echo."""
    expected = [("system", system)]
    for message in rounds:
        expected += [("user", message), ("assistant", echo_text(message))]
    return [*expected, ("user", then)]


def say(server: Server, client: Client, message: str) -> None:
    """One successful round with the fake's default reply."""
    assert_streamed(chat(server, client, message), echo_text(message))


def unique(prefix: str) -> str:
    """A message nobody else sends."""
    return f"{prefix}-{random_hex(3)}"


# -- streaming -------------------------------------------------------------------------------


def test_stream_headers_lines_and_usage(embedded: Server, fake: FakeProvider) -> None:
    """200 NDJSON, no-store, no proxy buffering; a text line per delta; usage at the end."""
    fake.script(Reply(deltas=["Hel", "lo, ", "world!"]))
    result = chat(embedded, embedded.client(), "hi")
    assert_streamed(result, "Hello, world!")
    assert result.response.header("Cache-Control") == "no-store"
    assert result.response.header("X-Accel-Buffering") == "no"
    assert result.texts == ["Hel", "lo, ", "world!"]
    assert result.lines[-1]["usage"] == DEFAULT_USAGE


def test_done_line_has_no_usage_when_provider_sent_none(
    embedded: Server, fake: FakeProvider
) -> None:
    """Without a usage chunk from the provider the done line carries no usage key."""
    fake.script(Reply(deltas=["ok"], usage=None))
    result = chat(embedded, embedded.client(), "hi")
    assert_streamed(result, "ok")
    assert "usage" not in result.lines[-1], result.lines


def test_first_line_arrives_before_provider_finishes(embedded: Server, fake: FakeProvider) -> None:
    """The first token reaches the client while the provider still holds the rest back."""
    gate = threading.Event()
    fake.script(Reply(deltas=["first", " second"], gate=gate))
    try:
        with ChatStream(embedded, embedded.client(), "hi") as stream:
            assert stream.status == 200
            assert stream.next_text() == "first"
            (request,) = fake.requests
            assert not request.finished.is_set(), "the provider had already finished"
            gate.set()
            result = stream.finish()
    finally:
        gate.set()
    assert_streamed(result, "first second")


def _raw_chunks(port: int, body: bytes) -> list[bytes]:
    """POST a chat over a raw socket; the HTTP chunks of the answer, as the server wrote them."""
    with socket.create_connection(("127.0.0.1", port), timeout=STREAM_TIMEOUT) as sock:
        sock.sendall(
            b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        raw = b""
        while data := sock.recv(65536):
            raw += data
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" in head.lower(), head
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        rest = rest[size + 2 :]


def test_a_busy_server_writes_several_tokens_at_once(
    make_server: ServerFactory, fake: FakeProvider
) -> None:
    """With more streams open than CHAT_BUSY_STREAMS (0 here), a stream writes at most every
    50 ms: 20 tokens 10 ms apart arrive complete and in order, in a handful of writes."""
    srv = make_server.start("embedded", chat_env(fake, CHAT_BUSY_STREAMS="0"))
    deltas = [f"t{i} " for i in range(20)]
    fake.script(Reply(deltas=deltas, delay=0.01))
    chunks = _raw_chunks(srv.port, json.dumps({"message": "hi"}).encode())
    lines = [json.loads(line) for line in b"".join(chunks).splitlines()]
    assert "".join(line.get("text", "") for line in lines) == "".join(deltas)
    assert lines[-1].get("done") is True
    assert len(chunks) <= 10, [len(c) for c in chunks]


@pytest.mark.parametrize(
    "framing",
    [
        {},
        {"crlf": True},
        {"keepalive": True},
        {"split": True},
        {"crlf": True, "keepalive": True, "split": True},
    ],
    ids=["lf", "crlf", "keepalive-comments", "split-events-and-chars", "all"],
)
def test_text_is_exactly_the_deltas(
    embedded: Server, fake: FakeProvider, framing: dict[str, bool]
) -> None:
    """CRLF, comment lines, events and UTF-8 characters cut across chunks: the text is exact."""
    fake.script(Reply(deltas=AWKWARD, **framing))
    result = chat(embedded, embedded.client(), "hi")
    assert_streamed(result, "".join(AWKWARD))
    assert result.lines[-1]["usage"] == DEFAULT_USAGE


def test_request_body_and_headers(embedded: Server, fake: FakeProvider) -> None:
    """Defaults: model, stream with usage, max_tokens, temperature, thinking off, bearer key."""
    message = unique("body")
    say(embedded, embedded.client(), message)
    (request,) = fake.requests
    assert (request.method, request.path) == ("POST", "/chat/completions")
    assert request.header("Authorization") == f"Bearer {KEY}"
    assert (request.header("Content-Type") or "").startswith("application/json")
    body = request.body
    assert body["model"] == DEFAULT_MODEL
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 1024
    assert body["temperature"] == 0.7
    assert body["thinking"] == {"type": "disabled"}
    assert turns(request) == [("system", SYSTEM), ("user", message)]


def test_thinking_custom_model_prompt_and_base_path(
    make_server: ServerFactory, fake: FakeProvider
) -> None:
    """CHAT_THINKING=1: thinking enabled, no temperature, reasoning never sent back."""
    srv = make_server.start(
        "embedded",
        chat_env(
            fake,
            DEEPSEEK_BASE_URL=fake.url("/v1"),
            CHAT_THINKING="1",
            DEEPSEEK_MODEL="deepseek-test-model",
            CHAT_MAX_TOKENS="77",
            SYSTEM_PROMPT="Answer like a pirate.",
        ),
    )
    client = srv.client()
    fake.script(Reply(reasoning=["Hmm, ", "arr."], deltas=["Ahoy", "!"]))
    first = chat(srv, client, "hello")
    assert_streamed(first, "Ahoy!")
    assert first.reasoning == "Hmm, arr."
    say(srv, client, "again")
    one, two = fake.requests
    assert one.path == "/v1/chat/completions"
    assert one.body["thinking"] == {"type": "enabled"}
    assert "temperature" not in one.body and "temperature" not in two.body
    assert one.body["model"] == "deepseek-test-model"
    assert one.body["max_tokens"] == 77
    assert turns(one) == [("system", "Answer like a pirate."), ("user", "hello")]
    assert turns(two) == [
        ("system", "Answer like a pirate."),
        ("user", "hello"),
        ("assistant", "Ahoy!"),
        ("user", "again"),
    ]


@pytest.mark.parametrize("name", ["openai", "dashscope"])
def test_other_providers_body(make_server: ServerFactory, fake: FakeProvider, name: str) -> None:
    """openai by CHAT_PROVIDER, dashscope as the only key: their URL, key and model, no thinking."""
    upper = name.upper()
    env = chat_env(
        fake,
        **{
            f"{upper}_API_KEY": f"sk-{name}-key",
            f"{upper}_BASE_URL": fake.url(f"/{name}/v1"),
            f"{upper}_MODEL": f"{name}-test-model",
            "CHAT_TEMPERATURE": "0.2",
        },
    )
    if name == "openai":
        env["CHAT_PROVIDER"] = "openai"
        env["DEEPSEEK_BASE_URL"] = fake.url("/not-deepseek")
    else:
        env["DEEPSEEK_API_KEY"] = None
    srv = make_server.start("embedded", env)
    say(srv, srv.client(), "hi")
    (request,) = fake.requests
    assert request.path == f"/{name}/v1/chat/completions"
    assert request.header("Authorization") == f"Bearer sk-{name}-key"
    assert request.body["model"] == f"{name}-test-model"
    assert request.body["stream"] is True
    assert request.body["temperature"] == 0.2
    assert "thinking" not in request.body
    assert turns(request) == [("system", SYSTEM), ("user", "hi")]


# -- history ---------------------------------------------------------------------------------


def test_second_request_forwards_previous_round(server: Server, fake: FakeProvider) -> None:
    """The system prompt, then the previous round as a user/assistant pair, then the message."""
    client = server.client()
    say(server, client, "one")
    say(server, client, "two")
    first, second = fake.requests
    assert turns(first) == history(then="one")
    assert turns(second) == history("one", then="two")


def test_history_keeps_the_last_max_history_rounds(server: Server, fake: FakeProvider) -> None:
    """With MAX_HISTORY=3, the fifth request forwards rounds 2 to 4 only."""
    client = server.client()
    for n in range(1, 6):
        say(server, client, f"m{n}")
    assert turns(fake.requests[-1]) == history("m2", "m3", "m4", then="m5")


def test_reset_chat_forgets_only_this_visitor(server: Server, fake: FakeProvider) -> None:
    """After /reset_chat the next request carries the system prompt and the new message only."""
    alice, bob = server.client(), server.client()
    say(server, alice, "a1")
    say(server, bob, "b1")
    answer = alice.post(RESET, {})
    assert answer.status == 200, answer
    assert answer.json() == {"ok": True, "status": "Reset chat history successfully"}
    say(server, alice, "a2")
    say(server, bob, "b2")
    assert turns(fake.requests[-2]) == history(then="a2")
    assert turns(fake.requests[-1]) == history("b1", then="b2")


def test_reasoning_streams_apart_and_stays_out_of_history(
    server: Server, fake: FakeProvider
) -> None:
    """Reasoning deltas come as reasoning lines, never in text, never forwarded again."""
    client = server.client()
    fake.script(Reply(reasoning=["Let me ", "think."], deltas=["Four", "."]))
    result = chat(server, client, "2+2?")
    assert_streamed(result, "Four.")
    assert result.reasoning == "Let me think."
    say(server, client, "thanks")
    assert turns(fake.requests[-1]) == [
        ("system", SYSTEM),
        ("user", "2+2?"),
        ("assistant", "Four."),
        ("user", "thanks"),
    ]


@pytest.mark.parametrize("mode", ["reset", "invalid_json", "truncate", "stall", "bad_chunk"])
def test_failure_after_tokens_ends_with_error_line(
    server: Server, fake: FakeProvider, mode: str
) -> None:
    """Reset, bad JSON, truncation, broken chunking or an idle provider after two tokens:
    an error line, nothing stored."""
    client = server.client()
    say(server, client, "before")
    fake.script(Reply(deltas=["par", "tial", " never"], mode=mode, fail_after=2))
    since = len(server.logs)
    result = chat(server, client, "broken")
    assert_failed_mid_stream(result, "partial")
    if mode == "stall":  # ended by CHAT_READ_TIMEOUT, not by the client's own timeout
        logged(server, "chat failed mid-answer: deepseek: stream went silent", since=since)
    say(server, client, "after")
    assert turns(fake.requests[-1]) == history("before", then="after")


@pytest.mark.parametrize("provider_pace", ["tokens", "quiet"])
def test_client_disconnect_closes_upstream(
    server: Server, fake: FakeProvider, provider_pace: str
) -> None:
    """A visitor who goes away mid-stream: the upstream connection closes, nothing is stored.

    "tokens": the provider keeps streaming slowly; "quiet": it sends only keep-alive comments.
    """
    client = server.client()
    say(server, client, "before")
    gate = threading.Event()
    if provider_pace == "tokens":
        slow = Reply(deltas=["tok "] * 400, delay=0.05)
    else:
        slow = Reply(deltas=["tok ", "never"], gate=gate, gate_keepalive=0.2)
    fake.script(slow)
    try:
        with ChatStream(server, client, "leaving") as stream:
            assert stream.status == 200
            assert stream.next_text() == "tok "
            request = fake.requests[-1]
        wait_until(
            request.connection.closed.is_set, 2.0, what="the provider to see its connection close"
        )
        assert request.connection.client_closed
    finally:
        gate.set()
    say(server, client, "after")
    assert turns(fake.requests[-1]) == history("before", then="after")


def test_visitor_leaving_before_the_first_token_closes_upstream(
    make_server: ServerFactory, fake: FakeProvider
) -> None:
    """A visitor who hangs up while the provider has not sent a token yet (a slow start, a
    thinking model): the provider connection closes at once, not after CHAT_READ_TIMEOUT,
    no other provider is asked, and the server logs the request as 499."""
    srv = make_server.start("embedded", chat_env(fake, CHAT_READ_TIMEOUT="20"))
    fake.script(Reply(mode="idle"))
    body = json.dumps({"message": "leaving early"}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=STREAM_TIMEOUT) as sock:
        sock.sendall(
            b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        (request,) = fake.wait_requests(1)
    # The deadline is far short of CHAT_READ_TIMEOUT (20 s); the log line names the cause.
    wait_until(request.connection.closed.is_set, 3, what="the provider connection to close")
    assert request.connection.client_closed
    logged(srv, "visitor left before the first token: provider connection closed")
    wait_until(lambda: "POST /deepseek_chat 499" in srv.log_text(), 3, what="the 499 line")
    assert len(fake.requests) == 1


def test_two_tabs_at_once_keep_history_in_pairs(server: Server, fake: FakeProvider) -> None:
    """Two overlapping streams with one cc_app, finishing in reverse order: history stays pairs."""
    client = server.client()
    say(server, client, "zero")
    gate_a, gate_b = threading.Event(), threading.Event()
    fake.script(Reply(gate=gate_a, gate_keepalive=0.2), Reply(gate=gate_b, gate_keepalive=0.2))
    try:
        with (
            ChatStream(server, client, "tab-a") as tab_a,
            ChatStream(server, client, "tab-b") as tab_b,
        ):
            assert (tab_a.status, tab_b.status) == (200, 200)
            tab_a.next_text()
            tab_b.next_text()
            gate_b.set()
            result_b = tab_b.finish()
            gate_a.set()
            result_a = tab_a.finish()
    finally:
        gate_a.set()
        gate_b.set()
    assert_streamed(result_a, echo_text("tab-a"))
    assert_streamed(result_b, echo_text("tab-b"))
    assert turns(fake.requests[1]) == history("zero", then="tab-a")
    assert turns(fake.requests[2]) == history("zero", then="tab-b")
    say(server, client, "after")
    forwarded = turns(fake.requests[-1])
    assert forwarded[0] == ("system", SYSTEM) and forwarded[-1] == ("user", "after"), forwarded
    pairs = forwarded[1:-1]
    assert len(pairs) % 2 == 0, forwarded
    rounds = [(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
    for user, assistant in rounds:
        assert user[0] == "user" and assistant == ("assistant", echo_text(user[1])), forwarded
    # Each reply joins the history once it streamed completely: both tabs' rounds are kept.
    users = [user[1] for user, _ in rounds]
    assert users[0] == "zero" and sorted(users[1:]) == ["tab-a", "tab-b"], forwarded


def test_200_simultaneous_streams(server: Server, fake: FakeProvider) -> None:
    """200 visitors streaming at once (all held open together) each get their own full text."""
    count = 200
    gate = threading.Event()
    fake.always(Reply(gate=gate, gate_keepalive=0.3))
    messages = [unique(f"many-{n}") for n in range(count)]

    def one(message: str) -> tuple[Chat, str | None]:
        """Stream one message as a new visitor."""
        client = server.client()
        result = chat(server, client, message, timeout=30.0)
        return result, client.cookies.get("cc_app")

    with ThreadPoolExecutor(max_workers=count) as pool:
        try:
            futures = [pool.submit(one, message) for message in messages]
            fake.wait_requests(count, timeout=20.0)
        finally:
            gate.set()
        results = [future.result() for future in futures]
    for message, (result, _) in zip(messages, results, strict=True):
        assert_streamed(result, echo_text(message))
    assert len({cookie for _, cookie in results}) == count


# -- failures before the first token ----------------------------------------------------------


@pytest.mark.parametrize(
    ("provider_status", "status", "code"),
    [
        (401, 503, "chat_unavailable"),
        (402, 503, "chat_unavailable"),
        (403, 503, "chat_unavailable"),
        (429, 429, "provider_rate_limited"),
        (500, 502, "provider_error"),
        (503, 502, "provider_error"),
    ],
)
def test_provider_http_error_maps_to_answer(
    embedded: Server, fake: FakeProvider, provider_status: int, status: int, code: str
) -> None:
    """Provider 401/402/403 -> 503, 429 -> 429 with its Retry-After, 5xx -> 502."""
    fake.always(Reply(status=provider_status, retry_after="7"))
    result = chat(embedded, embedded.client(), "hi")
    assert_error(result.response, status, code)
    if provider_status == 429:
        assert result.response.header("Retry-After") == "7"


@pytest.mark.parametrize(
    "reply",
    [
        Reply(mode="invalid_json", fail_after=0),
        Reply(mode="empty"),
        Reply(mode="truncate", fail_after=0),
    ],
    ids=["invalid-json", "done-without-content", "closed-before-content"],
)
def test_bad_stream_before_first_token_is_provider_error(
    embedded: Server, fake: FakeProvider, reply: Reply
) -> None:
    """An invalid stream, or one that ends before any content, is 502 provider_error."""
    fake.always(reply)
    assert_error(chat(embedded, embedded.client(), "hi").response, 502, "provider_error")


@pytest.mark.parametrize("mode", ["hang", "idle"])
def test_silent_provider_is_unreachable(embedded: Server, fake: FakeProvider, mode: str) -> None:
    """No answer, or headers and then silence: 503 provider_unreachable after the read timeout."""
    fake.always(Reply(mode=mode))
    since = len(embedded.logs)
    result = chat(embedded, embedded.client(), "hi")
    assert_error(result.response, 503, "provider_unreachable")
    # Given up at CHAT_READ_TIMEOUT (the client would wait STREAM_TIMEOUT): the log says so.
    cause = {"hang": "no answer: TimeoutError", "idle": "stream went silent"}[mode]
    logged(embedded, f"chat provider failed before the first token: deepseek: {cause}", since=since)


def test_connection_refused_is_unreachable(make_server: ServerFactory, fake: FakeProvider) -> None:
    """Nothing listens at the provider's address: 503 provider_unreachable, quickly."""
    dead = f"http://127.0.0.1:{free_port()}"
    srv = make_server.start("embedded", chat_env(fake, DEEPSEEK_BASE_URL=dead))
    result = chat(srv, srv.client(), "hi")
    assert_error(result.response, 503, "provider_unreachable")
    logged(srv, "chat provider failed before the first token: deepseek: connect failed:")


@pytest.mark.parametrize("framing", ["extensions", "close"])
def test_provider_body_framings(
    make_server: ServerFactory, provider: FakeProvider, fake: FakeProvider, framing: str
) -> None:
    """Chunk extensions and trailers, or a body that ends with the connection: the same
    answer; a connection is reused after trailers, never after a connection-ended body."""
    srv = make_server.start("embedded", chat_env(fake))
    before = provider.accepted_connections()
    for text in (["a", "b", "é🙂"], ["second"]):
        fake.script(Reply(deltas=text, framing=framing, split=True))
        assert_streamed(chat(srv, srv.client(), "hi"), "".join(text))
    assert provider.accepted_connections() - before == (1 if framing == "extensions" else 2)


def test_provider_by_host_name(make_server: ServerFactory, fake: FakeProvider) -> None:
    """A provider named by host name (resolved, then cached) streams like one by address;
    an unknown name is 503 provider_unreachable."""
    by_name = fake.url().replace("127.0.0.1", "localhost")
    srv = make_server.start("embedded", chat_env(fake, DEEPSEEK_BASE_URL=by_name))
    for text in ("first", "second"):
        fake.script(Reply(deltas=[text]))
        result = chat(srv, srv.client(), "hi")
        assert result.response.status == 200, result.response
        assert result.text == text
    unknown = make_server.start(
        "embedded", chat_env(fake, DEEPSEEK_BASE_URL="http://no-such-host.invalid")
    )
    assert_error(chat(unknown, unknown.client(), "hi").response, 503, "provider_unreachable")


# -- fallback ---------------------------------------------------------------------------------

DS_PATH = "/ds/chat/completions"
DSC_PATH = "/dsc/v1/chat/completions"


@pytest.fixture(scope="module")
def fallback(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, provider: FakeProvider
) -> Iterator[Server]:
    """deepseek (fake /ds) first, then openai (nothing listens), then dashscope (fake /dsc)."""
    env = chat_env(
        provider,
        DEEPSEEK_BASE_URL=provider.url("/ds"),
        CHAT_FALLBACK="openai,dashscope",
        OPENAI_API_KEY="sk-openai-key",
        OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
        DASHSCOPE_API_KEY="sk-dashscope-key",
        DASHSCOPE_BASE_URL=provider.url("/dsc/v1"),
        DASHSCOPE_MODEL="qwen-test",
    )
    yield from shared_server(request, tmp_path_factory, env, "embedded")


def test_fallback_to_a_working_provider(fallback: Server, fake: FakeProvider) -> None:
    """deepseek 500, openai refused: dashscope answers, with its own key and model."""
    fake.always(Reply(status=500), path=DS_PATH)
    say(fallback, fallback.client(), "hi")
    paths = [r.path for r in fake.requests]
    assert paths[0] == DS_PATH and paths[-1] == DSC_PATH, paths
    first, last = fake.requests[0], fake.requests[-1]
    assert first.header("Authorization") == f"Bearer {KEY}"
    assert last.header("Authorization") == "Bearer sk-dashscope-key"
    assert last.body["model"] == "qwen-test"
    assert "thinking" not in last.body
    assert turns(last) == [("system", SYSTEM), ("user", "hi")]


@pytest.mark.parametrize(
    ("primary", "last", "status", "code"),
    [
        (Reply(status=401), Reply(status=429, retry_after="7"), 429, "provider_rate_limited"),
        (Reply(status=429, retry_after="7"), Reply(status=403), 503, "chat_unavailable"),
        (Reply(status=402), Reply(status=500), 502, "provider_error"),
        (Reply(status=503), Reply(mode="hang"), 503, "provider_unreachable"),
        (Reply(status=500), Reply(mode="empty"), 502, "provider_error"),
    ],
    ids=["then-429", "then-403", "then-500", "then-hang", "then-empty"],
)
def test_fallback_last_failure_decides(
    fallback: Server, fake: FakeProvider, primary: Reply, last: Reply, status: int, code: str
) -> None:
    """When every provider fails before a token, the last failure picks the answer."""
    fake.always(primary, path=DS_PATH)
    fake.always(last, path=DSC_PATH)
    result = chat(fallback, fallback.client(), "hi")
    assert_error(result.response, status, code)
    if code == "provider_rate_limited":
        assert result.response.header("Retry-After") == "7"
    assert [r.path for r in fake.requests][-1] == DSC_PATH


def test_no_fallback_once_a_token_was_sent(fallback: Server, fake: FakeProvider) -> None:
    """deepseek resets after two tokens: an error line, and no other provider is asked."""
    fake.always(Reply(deltas=["a", "b", "c"], mode="reset", fail_after=2), path=DS_PATH)
    assert_failed_mid_stream(chat(fallback, fallback.client(), "hi"), "ab")
    assert [r.path for r in fake.requests] == [DS_PATH]


# -- validation, login, limits, cookies ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "empty_message"),
        ({"message": None}, "empty_message"),
        ({"message": ""}, "empty_message"),
        ({"message": " \n\t "}, "empty_message"),
        ({"message": 123}, "invalid_input"),
        ({"message": True}, "invalid_input"),
        ({"message": ["hi"]}, "invalid_input"),
        ({"message": {"text": "hi"}}, "invalid_input"),
        ({"message": "a" * 4001}, "message_too_long"),
    ],
    ids=[
        "missing",
        "null",
        "empty",
        "whitespace",
        "number",
        "bool",
        "list",
        "object",
        "too-long",
    ],
)
def test_invalid_message_is_400(
    embedded: Server, fake: FakeProvider, body: dict[str, Any], code: str
) -> None:
    """Missing, empty, non-string or too long: 400 with its code, and no provider request."""
    assert_error(chat(embedded, embedded.client(), body=body).response, 400, code)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [(b"{", "application/json"), (b"[]", "application/json"), (b"hi", "text/plain")],
    ids=["malformed-json", "array", "text-plain"],
)
def test_bad_body_is_4xx_json(
    embedded: Server, fake: FakeProvider, raw: bytes, content_type: str
) -> None:
    """Malformed JSON, a non-object body or a wrong content type: a 4xx JSON error."""
    result = chat(embedded, embedded.client(), raw=raw, headers={"Content-Type": content_type})
    assert 400 <= result.status < 500, result.response
    assert result.response.json().get("ok") is False
    assert fake.requests == []


def test_long_message_limit_counts_characters(embedded: Server, fake: FakeProvider) -> None:
    """CHAT_MAX_CHARS (4000) counts characters: 4000 two-byte characters pass intact."""
    message = "é" * 4000
    say(embedded, embedded.client(), message)
    assert turns(fake.requests[-1])[-1] == ("user", message)


def test_extra_fields_are_ignored(embedded: Server, fake: FakeProvider) -> None:
    """The front end's guideMode, presetId and locale do not change the request."""
    body = {"message": "hi", "guideMode": True, "presetId": 3, "locale": "zh-CN"}
    assert_streamed(chat(embedded, embedded.client(), body=body), echo_text("hi"))
    assert turns(fake.requests[-1]) == [("system", SYSTEM), ("user", "hi")]


def test_cc_app_cookie_set_once_with_attributes(embedded: Server, fake: FakeProvider) -> None:
    """The first chat sets an opaque HttpOnly, Lax, Path=/ cc_app; the next one keeps it."""
    client = embedded.client()
    first = chat(embedded, client, "one")
    cookie = first.response.cookie("cc_app")
    assert cookie is not None, first.response.headers
    value, attrs = cookie
    assert len(value) >= 16, value
    assert "httponly" in attrs and attrs.get("path") == "/", attrs
    assert attrs.get("samesite", "").lower() == "lax", attrs
    assert "secure" not in attrs, attrs
    again = chat(embedded, client, "two").response.cookie("cc_app")
    assert again is None or again[0] == value, again
    other = chat(embedded, embedded.client(), "three").response.cookie("cc_app")
    assert other is not None and other[0] != value


def test_require_auth_and_secure_cookie(make_server: ServerFactory, fake: FakeProvider) -> None:
    """CHAT_REQUIRE_AUTH=1: 401 without a session, 200 with one; COOKIE_SECURE adds Secure."""
    srv = make_server.start("embedded", chat_env(fake, CHAT_REQUIRE_AUTH="1", COOKIE_SECURE="1"))
    assert_error(chat(srv, srv.client(), "hi").response, 401, "unauthorized")
    assert fake.requests == []
    client = srv.client()
    email, password = random_email(), strong_password()
    assert client.register(email, password).status == 201
    login = client.login(email, password)
    for name in ("cc_auth", "cc_device"):
        cookie = login.cookie(name)
        assert cookie is not None and "secure" in cookie[1], login.headers
    result = chat(srv, client, "hi")
    assert_streamed(result, echo_text("hi"))
    # A logged-in visitor's history belongs to the account: no visitor id is issued.
    assert result.response.cookie("cc_app") is None, result.response.headers


def test_chat_rate_limits_per_visitor_and_ip(
    make_server: ServerFactory, fake: FakeProvider
) -> None:
    """RATE_CHAT_VISITOR=2/60 and RATE_CHAT_IP=4/60: the next request is 429 with Retry-After."""
    srv = make_server.start(
        "embedded", chat_env(fake, RATE_CHAT_VISITOR="2/60", RATE_CHAT_IP="4/60")
    )
    visitor = srv.client({"X-Forwarded-For": "198.18.0.1"})
    say(srv, visitor, "one")
    say(srv, visitor, "two")
    limited = chat(srv, visitor, "three").response
    assert_error(limited, 429, "rate_limited")
    assert (limited.header("Retry-After") or "").isdigit(), limited.headers
    assert 0 < int(limited.header("Retry-After") or "0") <= 60
    say(srv, srv.client({"X-Forwarded-For": "198.18.0.1"}), "new visitor, same address")
    for n in range(4):
        say(srv, srv.client({"X-Forwarded-For": "198.18.0.2"}), f"visitor {n}")
    limited = chat(srv, srv.client({"X-Forwarded-For": "198.18.0.2"}), "fifth").response
    assert_error(limited, 429, "rate_limited")
    assert (limited.header("Retry-After") or "").isdigit(), limited.headers


def test_echo_provider_without_keys(make_server: ServerFactory) -> None:
    """With no API key at all, an offline echo provider answers and says so in the log."""
    srv = make_server.start("embedded", {**HIGH_LIMITS, **HIGH_CHAT})
    assert_streamed(chat(srv, srv.client(), "ping 你好 🙂"), "Echo: ping 你好 🙂")
    assert "offline echo provider" in srv.log_text()


# -- upstream connections ---------------------------------------------------------------------


def test_no_upstream_connection_is_leaked(make_server: ServerFactory) -> None:
    """After a burst and a run of failing streams, no more upstream connections than the burst."""
    own = FakeProvider()
    try:
        srv = make_server.start("embedded", chat_env(own))
        burst = 10
        with ThreadPoolExecutor(max_workers=burst) as pool:
            done = list(pool.map(lambda n: chat(srv, srv.client(), f"burst {n}"), range(burst)))
        for n, result in enumerate(done):
            assert_streamed(result, echo_text(f"burst {n}"))
        after_burst = own.open_connections()
        own.script(
            Reply(status=500),
            Reply(mode="reset"),
            Reply(mode="invalid_json"),
            Reply(mode="truncate"),
            Reply(mode="stall"),
            Reply(mode="empty"),
            Reply(status=429),
            Reply(mode="reset"),
            Reply(mode="truncate"),
        )
        statuses = [chat(srv, srv.client(), f"seq {n}").status for n in range(12)]
        # 500 and an empty stream before any text: 502; 429 passed on; a failure after the
        # first token: 200 with an error line; the echo once the script is used up: 200.
        assert statuses == [502, 200, 200, 200, 200, 502, 429, 200, 200, 200, 200, 200]
        wait_until(
            lambda: own.open_connections() <= burst,
            3.0,
            what=f"open upstream connections ({own.open_connections()}) to drop to {burst}",
        )
        print(
            f"upstream connections: {own.accepted_connections()} accepted,"
            f" {after_burst} open after the burst, {own.open_connections()} open at the end"
        )
        srv.stop()
        wait_until(lambda: own.open_connections() == 0, 3.0, what="connections to close")
    finally:
        own.stop()


def test_provider_faults_leave_no_greenlet_or_socket_behind(
    make_server: ServerFactory, fake: FakeProvider
) -> None:
    server = make_server.start("embedded", chat_env(fake))
    client = server.client()
    say(server, client, "warm-up")  # the upstream pool now holds one idle connection
    baseline = server_stats(server)

    for reply in (
        Reply(mode="hang"),
        Reply(mode="idle"),
        Reply(status=500),
        Reply(mode="reset", fail_after=2),
        Reply(mode="invalid_json", fail_after=1),
        Reply(mode="truncate", fail_after=1),
        Reply(mode="stall", fail_after=1),
    ):
        fake.script(reply)
        sent = len(fake.requests)
        result = chat(server, client, "fault")
        assert result.status != 200 or "error" in result.lines[-1], (reply.mode, result.lines)
        # Sent once: a slow provider on a kept-alive connection is not asked twice.
        assert len(fake.requests) == sent + 1, reply.mode
    fake.script(Reply(deltas=["tok "] * 400, delay=0.05))
    with ChatStream(server, client, "leaving") as stream:
        assert stream.next_text() == "tok "
    say(server, client, "after")

    def settled() -> dict[str, int] | None:
        """Stats once the counts are back at the baseline."""
        now = server_stats(server)
        return now if now["greenlets"] <= baseline["greenlets"] else None

    after = wait_until(settled, 10, what="greenlets back at the baseline")
    assert after["connections"] <= 1, after  # only the stats poll itself, if anything
    # Idle provider connections are kept (at most 4 per host); nothing else piles up.
    assert after["open_fds"] <= baseline["open_fds"] + 3, (baseline, after)


def test_provider_closing_a_held_request_is_not_asked_again(
    make_server: ServerFactory, fake: FakeProvider
) -> None:
    """A reused connection the provider closes after holding the request: no resend."""
    server = make_server.start("embedded", chat_env(fake, CHAT_READ_TIMEOUT="10"))
    client = server.client()
    say(server, client, "warm-up")  # the next request goes out on the kept-alive connection
    sent = len(fake.requests)
    fake.script(Reply(mode="hang", hold=1.5))
    result = chat(server, client, "held")
    assert_error(result.response, 503, "provider_unreachable")
    assert len(fake.requests) == sent + 1  # asked once, not twice
