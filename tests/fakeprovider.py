"""A fake OpenAI-compatible chat-completions provider on loopback, able to misbehave on demand.

It is a real HTTP/1.1 server written on raw sockets (one thread per connection) so that it
controls every byte and every write boundary: each SSE event goes out as its own HTTP chunk,
or, on demand, events and multi-byte UTF-8 characters are cut across chunks. Replies come
from a script (a queue per path, then a sticky default); every request is recorded, and
every connection remembers when it closed and whether the client closed it.

With `tls` (a server-side ssl.SSLContext) it speaks HTTPS instead: each connection's thread
does the handshake before reading a request, and the connection records whether the
handshake resumed a session (or why it failed).

bench/provider.py runs it under gevent (a greenlet per connection) as the benchmarks'
provider, with recording off.
"""

from __future__ import annotations

import collections
import functools
import json
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
GATE_LIMIT = 20.0  # longest a reply waits on its gate before it goes on anyway
HANG_LIMIT = 30.0  # longest a hanging or stalled reply holds its connection
POLL_SLICE = 0.02
SPLIT_GAP = 0.005  # between the pieces of a split event, so they reach the peer apart
HANDSHAKE_LIMIT = 10.0  # longest a TLS handshake may take before the connection is dropped
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
ERROR_TYPES = {
    401: "authentication_error",
    402: "insufficient_balance",
    403: "permission_denied",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_overloaded",
}
# Reply modes: what happens after the status line.
MODES = ("ok", "hang", "idle", "stall", "reset", "invalid_json", "truncate", "empty", "bad_chunk")
# How the body is framed: HTTP chunks; chunks with extensions and a trailer field after
# the last one; or no chunking at all, the body ending with the connection.
FRAMINGS = ("chunked", "extensions", "close")


def echo_text(message: str) -> str:
    """The text the default reply streams for a user message."""
    return f"Reply to {message}"


@dataclass
class Reply:
    """One scripted answer to one request.

    mode: "ok" streams a full reply; "hang" reads the request and never answers; "idle"
    sends the status line and headers, then nothing; "stall" sends `fail_after` tokens,
    then nothing; "reset" sends `fail_after` tokens, then resets the connection (RST);
    "invalid_json" sends `fail_after` tokens, a data line that is not JSON, then ends the
    stream normally; "truncate" sends `fail_after` tokens and half an event, then closes
    without [DONE]; "empty" sends the role chunk and [DONE] but no content; "bad_chunk"
    sends `fail_after` tokens, then a chunk-size line that is not hexadecimal.
    """

    deltas: list[str] | None = None  # None: echo_text(last user message), in three pieces
    reasoning: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))
    status: int = 200
    retry_after: str | None = None
    mode: str = "ok"
    fail_after: int = 2
    crlf: bool = False
    keepalive: bool = False  # ": keep-alive" comments before the first event and between tokens
    split: bool = False  # cut events (and multi-byte characters) across HTTP chunks
    delay: float = 0.0  # between content tokens, on a fixed schedule (no drift under load)
    first: float = 0.0  # pause before the first content token
    gate: threading.Event | None = None  # waited on after the first content token
    gate_keepalive: float = 0.0  # while waiting on the gate, a keep-alive comment this often
    hold: float = HANG_LIMIT  # "hang": seconds (or until `gate` is set) before it is closed
    framing: str = "chunked"  # one of FRAMINGS

    def __post_init__(self) -> None:
        """Refuse unknown modes and framings early."""
        if self.mode not in MODES:
            raise ValueError(f"unknown reply mode {self.mode!r}")
        if self.framing not in FRAMINGS:
            raise ValueError(f"unknown framing {self.framing!r}")

    def content(self, body: Any) -> list[str]:
        """The content deltas for a request body."""
        if self.deltas is not None:
            return list(self.deltas)
        text = echo_text(last_user_message(body))
        third = max(1, len(text) // 3)
        return [text[:third], text[third : 2 * third], text[2 * third :]]


def last_user_message(body: Any) -> str:
    """The content of the last user message of a chat-completions body ('' if none)."""
    try:
        users = [m for m in body["messages"] if m.get("role") == "user"]
        return str(users[-1]["content"])
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""


class ClientGone(Exception):
    """The peer closed the connection (EOF or a failed write), or the provider stops."""


@dataclass
class Connection:
    """One accepted TCP connection."""

    number: int
    sock: socket.socket
    opened_at: float
    closed: threading.Event = field(default_factory=threading.Event)
    closed_at: float | None = None
    client_closed: bool = False  # the peer went away (rather than the provider closing)
    requests: int = 0
    resumed: bool | None = None  # TLS: the handshake resumed a session; None: plain TCP
    handshake_error: str | None = None  # TLS: why the handshake failed (then it is closed)
    # TLS: request bytes read while watching for the peer going away (an SSL socket has
    # no MSG_PEEK); the next read of a request takes them first.
    held: bytes = b""

    def mark_closed(self, by_client: bool) -> None:
        """Record that the connection is over."""
        if not self.closed.is_set():
            self.client_closed = by_client
            self.closed_at = time.monotonic()
            self.closed.set()


@dataclass
class Recorded:
    """One request as the provider received it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    raw_body: bytes
    body: Any  # parsed JSON, or None when it was not JSON
    connection: Connection
    received_at: float
    finished: threading.Event = field(default_factory=threading.Event)  # reply fully written

    def header(self, name: str) -> str | None:
        """One request header, by case-insensitive name."""
        return self.headers.get(name.lower())

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The chat messages of the body."""
        return list(self.body["messages"])

    def turns(self) -> list[tuple[str, str]]:
        """The messages as (role, content) pairs."""
        return [(m["role"], m["content"]) for m in self.messages]


def _cut_points(data: bytes) -> list[int]:
    """Where to cut one event: after 'data:', mid-way, inside each multi-byte character, in CRLF."""
    cuts = {5, len(data) // 2}
    for i in range(1, len(data)):
        if 0x80 <= data[i] <= 0xBF and data[i - 1] >= 0xC0:
            cuts.add(i)  # right after a lead byte: the character straddles two chunks
        if data[i - 1 : i + 1] == b"\r\n":
            cuts.add(i)
    return sorted(c for c in cuts if 0 < c < len(data))


class _Stream:
    """Writes one reply's SSE events as HTTP chunks, watching for the client going away."""

    def __init__(self, provider: FakeProvider, conn: Connection, reply: Reply) -> None:
        """Remember the connection and the reply's framing options."""
        self.provider = provider
        self.conn = conn
        self.reply = reply
        self.eol = b"\r\n" if reply.crlf else b"\n"
        self.carry = b""
        self.due = 0.0  # when the next content token is due (`delay`'s fixed schedule)

    def send(self, data: bytes) -> None:
        """Write raw bytes; a failed write means the client went away."""
        try:
            self.conn.sock.sendall(data)
        except OSError as exc:
            raise ClientGone(str(exc)) from exc

    def chunk(self, data: bytes) -> None:
        """Write one HTTP chunk (or, without chunking, the bytes as they are)."""
        if not data:
            return
        if self.reply.framing == "close":
            self.send(data)
        elif self.reply.framing == "extensions":
            self.send(b"%x;name=value\r\n" % len(data) + data + b"\r\n")
        else:
            self.send(b"%x\r\n" % len(data) + data + b"\r\n")

    def event(self, payload: dict[str, Any] | str) -> None:
        """Write one SSE data event (a JSON object, or a raw string such as [DONE])."""
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        data = b"data: " + text.encode("utf-8") + self.eol + self.eol
        if not self.reply.split:
            self.chunk(data)
            return
        cuts = _cut_points(data)
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        pieces[0] = self.carry + pieces[0]
        self.carry = pieces.pop()  # the event's tail goes out with the next event's head
        for piece in pieces:
            self.chunk(piece)
            self.provider.pause(self.conn, SPLIT_GAP)

    def comment(self) -> None:
        """Write an SSE comment line, as providers do to keep a quiet stream alive."""
        self.flush()
        self.chunk(b": keep-alive" + self.eol + self.eol)

    def flush(self) -> None:
        """Write what a split event held back."""
        self.chunk(self.carry)
        self.carry = b""

    def end(self) -> None:
        """Write the terminating zero-length chunk (a trailer field with extensions), or,
        without chunking, close the sending side."""
        self.flush()
        if self.reply.framing == "close":
            self.conn.sock.shutdown(socket.SHUT_WR)
        elif self.reply.framing == "extensions":
            self.send(b"0;last=1\r\nX-Trailer: done\r\n\r\n")
        else:
            self.send(b"0\r\n\r\n")


def _chunk_body(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    """A chat.completion.chunk object with one choice."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


@functools.lru_cache(maxsize=1024)
def _content_event(piece: str) -> str:
    """The JSON text of a content chunk (cached: a benchmark streams the same token often)."""
    return json.dumps(_chunk_body({"content": piece}), ensure_ascii=False)


class FakeProvider:
    """The fake provider: start it, script replies, read what it received, stop it."""

    def __init__(
        self, record: bool = True, watch: bool = True, tls: ssl.SSLContext | None = None
    ) -> None:
        """Listen on an ephemeral loopback port and accept in a background thread."""
        self.record = record  # False: requests are not kept (a long benchmark)
        self.watch = watch  # False: a pause between tokens is a plain sleep (cheaper)
        self.tls = tls  # a server-side context: HTTPS, each connection wrapped in its thread
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._queues: dict[str | None, collections.deque[Reply]] = collections.defaultdict(
            collections.deque
        )
        self._defaults: dict[str | None, Reply] = {}
        self._requests: list[Recorded] = []
        self._connections: list[Connection] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1024)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="fake-accept", daemon=True)
        self._acceptor.start()

    # -- scripting and inspection -------------------------------------------------------

    def url(self, prefix: str = "") -> str:
        """A base URL for the server under test (requests go to <base>/chat/completions)."""
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}{prefix}"

    def script(self, *replies: Reply, path: str | None = None) -> None:
        """Queue replies, consumed one per request (only by requests to `path` when given)."""
        with self._lock:
            self._queues[path].extend(replies)

    def always(self, reply: Reply, path: str | None = None) -> None:
        """Answer with this reply whenever the queues are empty (for `path` when given)."""
        with self._lock:
            self._defaults[path] = reply

    def clear(self) -> None:
        """Forget scripts, defaults and recorded requests (connections stay as they are)."""
        with self._lock:
            self._queues.clear()
            self._defaults.clear()
            self._requests.clear()

    @property
    def requests(self) -> list[Recorded]:
        """Every request received since the last clear(), oldest first."""
        with self._lock:
            return list(self._requests)

    def wait_requests(self, count: int, timeout: float = 10.0) -> list[Recorded]:
        """Poll until at least `count` requests arrived; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.requests
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{len(found)} of {count} provider request(s) arrived within {timeout}s"
                )
            self._closing.wait(POLL_SLICE)

    def open_connections(self) -> int:
        """Connections accepted and not yet closed."""
        with self._lock:
            return sum(1 for c in self._connections if not c.closed.is_set())

    def accepted_connections(self) -> int:
        """Connections accepted since start."""
        with self._lock:
            return len(self._connections)

    def connections(self) -> list[Connection]:
        """Every connection accepted since start, oldest first (open or closed)."""
        with self._lock:
            return list(self._connections)

    def stop(self) -> None:
        """Stop accepting, wake and close every connection, join every thread."""
        self._closing.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for conn in connections:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(5)

    # -- connection handling ------------------------------------------------------------

    def _accept(self) -> None:
        """Accept connections until stopped, one thread each."""
        while not self._closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = Connection(len(self._connections) + 1, sock, time.monotonic())
                self._connections.append(conn)
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name=f"fake-conn-{conn.number}", daemon=True
                )
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: Connection) -> None:
        """Answer requests on one keep-alive connection until either side ends it."""
        by_client = False
        buffer = b""
        if self.tls is not None and not self._handshake(conn, self.tls):
            return
        try:
            while not self._closing.is_set():
                parsed = self._read_request(conn, buffer)
                if parsed is None:
                    by_client = True
                    break
                request, buffer = parsed
                reply = self._next_reply(request.path)
                keep = self._answer(conn, request, reply)
                request.finished.set()
                if not keep or request.header("connection") == "close":
                    break
        except ClientGone:
            by_client = not self._closing.is_set()
        except OSError:
            by_client = True
        finally:
            try:
                conn.sock.close()
            except OSError:
                pass
            conn.mark_closed(by_client)

    def _handshake(self, conn: Connection, context: ssl.SSLContext) -> bool:
        """Wrap the connection's socket in TLS and do the server's handshake; False (the
        connection closed, the error recorded) when it fails, e.g. the client refused the
        certificate."""
        try:
            wrapped = context.wrap_socket(
                conn.sock, server_side=True, do_handshake_on_connect=False
            )
        except (OSError, ValueError) as exc:
            conn.handshake_error = f"{type(exc).__name__}: {exc}"
            conn.mark_closed(by_client=True)
            return False
        with self._lock:
            conn.sock = wrapped  # stop() shuts down the wrapped socket from now on
        try:
            wrapped.settimeout(HANDSHAKE_LIMIT)
            wrapped.do_handshake()
            wrapped.settimeout(None)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            conn.handshake_error = f"{type(exc).__name__}: {exc}"
            try:
                wrapped.close()
            except OSError:
                pass
            conn.mark_closed(by_client=True)
            return False
        conn.resumed = wrapped.session_reused
        return True

    def _recv(self, conn: Connection) -> bytes:
        """Receive some bytes; b'' when the peer closed."""
        if conn.held:
            data, conn.held = conn.held, b""
            return data
        try:
            return conn.sock.recv(65536)
        except OSError:
            return b""

    def _read_request(self, conn: Connection, buffer: bytes) -> tuple[Recorded, bytes] | None:
        """Read one request (Content-Length or chunked body); None at EOF."""
        while b"\r\n\r\n" not in buffer:
            data = self._recv(conn)
            if not data:
                return None
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, rest = self._read_chunked(conn, rest)
        else:
            length = int(headers.get("content-length", "0"))
            while len(rest) < length:
                data = self._recv(conn)
                if not data:
                    return None
                rest += data
            body, rest = rest[:length], rest[length:]
        try:
            parsed: Any = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        conn.requests += 1
        request = Recorded(method, path, headers, body, parsed, conn, time.monotonic())
        if self.record:
            with self._lock:
                self._requests.append(request)
        return request, rest

    def _read_chunked(self, conn: Connection, rest: bytes) -> tuple[bytes, bytes]:
        """Read a chunked request body; return (body, bytes after it)."""
        body = b""
        while True:
            while b"\r\n" not in rest:
                data = self._recv(conn)
                if not data:
                    raise ClientGone("EOF in a chunked request body")
                rest += data
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                data = self._recv(conn)
                if not data:
                    raise ClientGone("EOF in a chunked request body")
                rest += data
            if size == 0:
                while not rest.startswith(b"\r\n"):  # skip trailers
                    _, sep, remainder = rest.partition(b"\r\n")
                    if not sep:
                        data = self._recv(conn)
                        if not data:
                            raise ClientGone("EOF in chunked trailers")
                        rest += data
                        continue
                    rest = remainder
                return body, rest[2:]
            body += rest[:size]
            rest = rest[size + 2 :]

    def _next_reply(self, path: str) -> Reply:
        """The next scripted reply for a path: its queue, the shared queue, then defaults."""
        with self._lock:
            for key in (path, None):
                if self._queues.get(key):
                    return self._queues[key].popleft()
            for key in (path, None):
                if key in self._defaults:
                    return self._defaults[key]
        return Reply()

    def pause(
        self,
        conn: Connection,
        seconds: float,
        until: threading.Event | None = None,
        every: float = 0.0,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Wait up to `seconds` (or until the event), raising ClientGone when the peer closes."""
        if not self.watch and until is None and tick is None:
            if self._closing.wait(max(0.0, seconds)):
                raise ClientGone("provider stopping")
            return
        deadline = time.monotonic() + seconds
        next_tick = time.monotonic() + every
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        while True:
            if until is not None and until.is_set():
                return
            if self._closing.is_set():
                raise ClientGone("provider stopping")
            now = time.monotonic()
            if now >= deadline:
                return
            if tick is not None and every > 0 and now >= next_tick:
                tick()
                next_tick = now + every
            if isinstance(conn.sock, ssl.SSLSocket):
                if conn.sock.pending() or poller.poll(min(POLL_SLICE, deadline - now) * 1000):
                    self._hold_tls_input(conn)
                    self._closing.wait(POLL_SLICE)
                continue
            if poller.poll(min(POLL_SLICE, deadline - now) * 1000):
                try:
                    peeked = conn.sock.recv(1, socket.MSG_PEEK)
                except OSError as exc:
                    raise ClientGone(str(exc)) from exc
                if not peeked:
                    raise ClientGone("EOF")
                # Bytes of a next request while this one streams: leave them, wait a slice.
                self._closing.wait(POLL_SLICE)

    def _hold_tls_input(self, conn: Connection) -> None:
        """While a reply streams over TLS: read what the peer sent without blocking and keep
        it for the next request, raising ClientGone at its end (a TLS socket cannot peek)."""
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        sock.setblocking(False)
        try:
            data = sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # only part of a record has arrived
        except OSError as exc:
            raise ClientGone(str(exc)) from exc
        finally:
            try:
                sock.setblocking(True)
            except OSError:
                pass
        if not data:
            raise ClientGone("EOF")
        conn.held += data

    def _answer(self, conn: Connection, request: Recorded, reply: Reply) -> bool:
        """Answer one request as scripted; True when the connection can serve another."""
        if reply.mode == "hang":
            self.pause(conn, reply.hold, reply.gate)
            return False
        if reply.status != 200:
            return self._answer_error(conn, reply)
        stream = _Stream(self, conn, reply)
        framing = (
            b"Connection: close\r\n"
            if reply.framing == "close"
            else b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n"
        )
        stream.send(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\n"
            + framing
            + b"Cache-Control: no-cache\r\n\r\n"
        )
        if reply.mode == "idle":
            self.pause(conn, HANG_LIMIT)
            return False
        if reply.keepalive:
            stream.comment()
        stream.event(_chunk_body({"role": "assistant", "content": ""}))
        for piece in reply.reasoning:
            stream.event(_chunk_body({"reasoning_content": piece}))
            if reply.keepalive:
                stream.comment()
        if reply.first:
            self.pause(conn, reply.first)
        stream.due = time.monotonic()
        if reply.mode != "empty":
            for index, piece in enumerate(reply.content(request.body)):
                if reply.mode != "ok" and index == reply.fail_after:
                    return self._misbehave(conn, stream, reply)
                stream.event(_content_event(piece))
                self._after_token(conn, stream, reply, index)
            if reply.mode != "ok":
                return self._misbehave(conn, stream, reply)
        stream.event(_chunk_body({}, finish="stop"))
        if reply.usage is not None:
            usage_chunk = _chunk_body({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = reply.usage
            stream.event(usage_chunk)
        stream.event("[DONE]")
        stream.end()
        return reply.framing != "close"

    def _after_token(self, conn: Connection, stream: _Stream, reply: Reply, index: int) -> None:
        """Gate, delay and keep-alive comments after one content token."""
        if index == 0 and reply.gate is not None:
            stream.flush()
            self.pause(conn, GATE_LIMIT, reply.gate, reply.gate_keepalive, stream.comment)
            stream.due = time.monotonic()
        if reply.delay:
            stream.flush()
            stream.due += reply.delay
            self.pause(conn, stream.due - time.monotonic())
        if reply.keepalive:
            stream.comment()

    def _misbehave(self, conn: Connection, stream: _Stream, reply: Reply) -> bool:
        """The failing end of a stall, reset, invalid_json or truncate reply."""
        stream.flush()
        if reply.mode == "stall":
            self.pause(conn, HANG_LIMIT)
            return False
        if reply.mode == "reset":
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.sock.close()
            return False
        if reply.mode == "bad_chunk":
            stream.send(b"zz\r\ndata: {}\r\n")
            self.pause(conn, HANG_LIMIT)
            return False
        if reply.mode == "truncate":
            stream.chunk(b'data: {"id":"chatcmpl-fake","object":"chat.comp')
            conn.sock.shutdown(socket.SHUT_WR)
            return False
        # invalid_json: a broken data line, then the stream ends as if all were well.
        stream.chunk(b'data: {"choices": [{"delta": {"content": "oops"' + stream.eol * 2)
        stream.event(_chunk_body({}, finish="stop"))
        stream.event("[DONE]")
        stream.end()
        return reply.framing != "close"

    def _answer_error(self, conn: Connection, reply: Reply) -> bool:
        """An HTTP error answer with a JSON error body, as providers send them."""
        body = json.dumps(
            {
                "error": {
                    "message": f"fake provider error {reply.status}",
                    "type": ERROR_TYPES.get(reply.status, "error"),
                }
            }
        ).encode("utf-8")
        head = [
            f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'Error')}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: keep-alive",
        ]
        if reply.retry_after is not None:
            head.append(f"Retry-After: {reply.retry_after}")
        stream = _Stream(self, conn, reply)
        stream.send(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        return True
