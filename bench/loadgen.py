"""Event-driven HTTP/1.1 load generator in the standard library (selectors), for bench/run.py.

    .venv/bin/python bench/loadgen.py chat --port P [--streams 500] [--timeout 60]
    .venv/bin/python bench/loadgen.py get --port P --path /auth/me [--header 'Cookie: x=y']
                                         [--connections 50] [--duration 5]

`chat`: opens every connection at once, POSTs {"message": ...} to /deepseek_chat on each
(no cookie, so each is a new visitor) and reads the NDJSON answer; per stream it records
when the connection was up, when the first line arrived and when the answer ended, all
from the moment the wave started, plus the outcome: ok (a {"done": true} last line),
over_capacity (the quick 503), error_line, http_<status>[:<code>], reset, closed_early,
timeout.

`get`: keeps `connections` keep-alive connections busy with the same GET for `duration`
seconds (wrk's job, for machines without wrk) and reports requests, latencies and errors.

One process, one thread, epoll: it reads whole socket buffers at a time and decodes chunked
bodies without copying lines around, so at 500 streams x 50 lines/s it stays far from a
core. Prints one JSON object on stdout. Loopback use only; every loop ends by `timeout`.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import sys
import time
from typing import Any

RECV_BYTES = 65536


class Exchange:
    """One connection and the response being read on it."""

    def __init__(self, number: int, request: bytes, started: float) -> None:
        self.number, self.request = number, request
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.started = started  # of the wave (chat) or of this request (get)
        self.connected_at: float | None = None
        self.first_line_at: float | None = None
        self.done_at: float | None = None
        self.outcome, self.status, self.lines, self.keep_alive, self._outbox = "", 0, 0, True, b""
        self.reset_response()

    def reset_response(self) -> None:
        """Forget the previous response: the next one starts with a status line."""
        self._buffer, self._head_done, self._chunked = b"", False, False
        self._length: int | None = None
        self._chunk_left = 0  # bytes of chunk data still to come in the current chunk
        self._chunk_state = "size"  # size | data | crlf | trailer
        self.body = bytearray()

    def send_request(self) -> None:
        """Queue the request; whatever the socket takes now is sent."""
        self._outbox = self.request
        self.flush()

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left."""
        while self._outbox:
            try:
                sent = self.sock.send(self._outbox)
            except BlockingIOError:
                return False
            self._outbox = self._outbox[sent:]
        return True

    def feed(self, data: bytes, now: float) -> bool:
        """Take bytes of the response; True once it is complete."""
        if not self._head_done:
            self._buffer += data
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            head, data = self._buffer[:end].decode("latin-1"), self._buffer[end + 4 :]
            self._buffer, self._head_done = b"", True
            lines = head.split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == "content-length":
                    self._length = int(value)
                elif name == "transfer-encoding" and "chunked" in value:
                    self._chunked = True
                elif name == "connection" and value == "close":
                    self.keep_alive = False
        if self._chunked:
            return self._feed_chunked(data, now)
        self._take_body(data, now)
        return self._length is not None and len(self.body) >= self._length

    def _take_body(self, data: bytes, now: float) -> None:
        if data:
            if self.first_line_at is None and b"\n" in data:
                self.first_line_at = now
            self.body += data

    def _feed_chunked(self, data: bytes, now: float) -> bool:
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        pos = 0
        while pos < len(buffer):
            if self._chunk_state == "data":
                take = min(self._chunk_left, len(buffer) - pos)
                self._take_body(buffer[pos : pos + take], now)
                pos, self._chunk_left = pos + take, self._chunk_left - take
                if self._chunk_left == 0:
                    self._chunk_state = "crlf"
                continue
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                self._buffer = buffer[pos:]
                return False
            line, pos = buffer[pos:end], end + 2
            if self._chunk_state == "crlf":
                self._chunk_state = "size"
            elif self._chunk_state == "size":
                self._chunk_left = int(line.split(b";", 1)[0], 16)
                self._chunk_state = "data" if self._chunk_left else "trailer"
            elif not line:  # the empty line that ends the trailer: response complete
                return True
        return False

    def last_line(self) -> dict[str, Any]:
        """The body's last NDJSON line, parsed ({} if there is none or it is not JSON)."""
        lines = bytes(self.body).strip().split(b"\n")
        self.lines = len([line for line in lines if line])
        try:
            value = json.loads(lines[-1]) if lines and lines[-1] else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


def _start_connect(selector: selectors.BaseSelector, ex: Exchange, port: int) -> None:
    code = ex.sock.connect_ex(("127.0.0.1", port))
    if code not in (0, errno.EINPROGRESS):
        raise OSError(code, "connect failed")
    selector.register(ex.sock, selectors.EVENT_WRITE, ex)


def _on_writable(selector: selectors.BaseSelector, ex: Exchange, now: float) -> None:
    if ex.connected_at is None:
        error = ex.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, "connect failed")
        ex.connected_at = now
        ex.send_request()
    if ex.flush():
        selector.modify(ex.sock, selectors.EVENT_READ, ex)


def run_chat(port: int, streams: int, message: str, timeout: float) -> dict[str, Any]:
    """One wave of `streams` concurrent chat requests; per-stream timings and outcomes."""
    body = json.dumps({"message": message}).encode()
    request = (
        b"POST /deepseek_chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    selector, started = selectors.DefaultSelector(), time.monotonic()
    exchanges = [Exchange(number, request, started) for number in range(streams)]
    pending = set()
    for ex in exchanges:
        try:
            _start_connect(selector, ex, port)
            pending.add(ex)
        except OSError as exc:
            ex.outcome = f"connect_error:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
            ex.sock.close()
    deadline = started + timeout
    while pending and time.monotonic() < deadline:
        for key, events in selector.select(timeout=0.5):
            ex = key.data
            now = time.monotonic()
            try:
                if events & selectors.EVENT_WRITE:
                    _on_writable(selector, ex, now)
                    continue
                data = ex.sock.recv(RECV_BYTES)
                if data and not ex.feed(data, now):
                    continue
                ex.done_at = now
                ex.outcome = _chat_outcome(ex, complete=bool(data))
            except ConnectionResetError:
                ex.outcome = "reset"
            except OSError as exc:
                ex.outcome = f"error:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
            selector.unregister(ex.sock)
            ex.sock.close()
            pending.discard(ex)
    for ex in pending:
        ex.outcome = "timeout"
        selector.unregister(ex.sock)
        ex.sock.close()
    selector.close()
    streams = []
    for ex in exchanges:
        times = (_since(at, started) for at in (ex.connected_at, ex.first_line_at, ex.done_at))
        stream = dict(zip(("connect_s", "first_line_s", "done_s"), times, strict=True))
        streams.append({**stream, "status": ex.status, "lines": ex.lines, "outcome": ex.outcome})
    return {"streams": streams, "wall_s": time.monotonic() - started}


def _chat_outcome(ex: Exchange, complete: bool) -> str:
    """What a finished (or closed) chat exchange amounted to."""
    last = ex.last_line()
    if ex.status == 503 and last.get("code") == "over_capacity":
        return "over_capacity"
    if ex.status != 200 and ex.status:
        return f"http_{ex.status}:{last['code']}" if last.get("code") else f"http_{ex.status}"
    if not complete:
        return "closed_early"
    if last.get("done") is True:
        return "ok"
    return "error_line" if "error" in last else "bad_last_line"


def _since(moment: float | None, start: float) -> float | None:
    return None if moment is None else round(moment - start, 6)


def run_get(
    port: int, path: str, headers: list[str], connections: int, duration: float
) -> dict[str, Any]:
    """Keep `connections` connections busy with one GET for `duration` s (a small wrk)."""
    extra = "".join(f"{header}\r\n" for header in headers)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode("latin-1")
    selector, started = selectors.DefaultSelector(), time.monotonic()
    stop_at, latencies = started + duration, []
    errors = {"connect": 0, "read": 0, "status": 0}
    live: set[Exchange] = set()

    def open_one(number: int) -> None:
        ex = Exchange(number, request, time.monotonic())
        try:
            _start_connect(selector, ex, port)
            live.add(ex)
        except OSError:
            errors["connect"] += 1
            ex.sock.close()

    for number in range(connections):
        open_one(number)
    while live and time.monotonic() < stop_at + 5:
        for key, events in selector.select(timeout=0.5):
            ex = key.data
            now = time.monotonic()
            try:
                if events & selectors.EVENT_WRITE:
                    _on_writable(selector, ex, now)
                    continue
                data = ex.sock.recv(RECV_BYTES)
                if not data:
                    raise ConnectionResetError
                if not ex.feed(data, now):
                    continue
            except OSError:
                errors["read" if ex.connected_at else "connect"] += 1
                selector.unregister(ex.sock)
                ex.sock.close()
                live.discard(ex)
                if now < stop_at:
                    open_one(ex.number)
                continue
            latencies.append(now - ex.started)
            if not 200 <= ex.status < 400:
                errors["status"] += 1
            if now >= stop_at or not ex.keep_alive:
                selector.unregister(ex.sock)
                ex.sock.close()
                live.discard(ex)
                if now < stop_at:
                    open_one(ex.number)
                continue
            ex.reset_response()
            ex.started = now
            ex.send_request()
    for ex in live:
        selector.unregister(ex.sock)
        ex.sock.close()
    selector.close()
    elapsed = min(time.monotonic(), stop_at) - started
    latencies.sort()
    return {
        "requests": len(latencies), "duration_s": elapsed,
        "rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
        **{f"p{pct}_ms": _percentile(latencies, pct) * 1000 for pct in (50, 90, 99)},
        "max_ms": (latencies[-1] if latencies else 0.0) * 1000, "errors": errors,
    }  # fmt: skip


def _percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values (0 for none)."""
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[min(len(ordered), int(rank)) - 1]


def main() -> int:
    """Parse the command line, run one load, print its JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="one wave of concurrent chat streams")
    chat.add_argument("--port", type=int, required=True)
    chat.add_argument("--streams", type=int, default=500)
    chat.add_argument("--message", default="Hello from the benchmark")
    chat.add_argument("--timeout", type=float, default=60.0)
    get = commands.add_parser("get", help="keep-alive GET load, like wrk")
    get.add_argument("--port", type=int, required=True)
    get.add_argument("--path", required=True)
    get.add_argument("--header", action="append", default=[])
    get.add_argument("--connections", type=int, default=50)
    get.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    if args.command == "chat":
        result = run_chat(args.port, args.streams, args.message, args.timeout)
    else:
        result = run_get(args.port, args.path, args.header, args.connections, args.duration)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
