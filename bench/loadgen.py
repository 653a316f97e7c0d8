"""Event-driven HTTP/1.1 load generator in the standard library (selectors), for bench/run.py.

    .venv/bin/python bench/loadgen.py chat --port P [--streams 500] [--timeout 60]
    .venv/bin/python bench/loadgen.py get --port P --path /auth/me [--header 'Cookie: x=y']
                                         [--connections 50] [--duration 5]

`chat`: opens every connection at once, POSTs {"message": ...} to /deepseek_chat on each
(no cookie, so each is a new visitor) and reads the NDJSON answer; per stream it records
when the connection was up, when the first line arrived and when the answer ended, all
from the moment the wave started, plus the outcome: ok (a {"done": true} last line),
over_capacity (the quick 503), error_line, bad_last_line, http_<status>[:<code>], reset,
closed_early, timeout. `get`: keeps `connections` keep-alive connections busy with the same
GET for `duration` seconds (wrk's job, for machines without wrk).

One process, one thread, epoll, whole socket buffers at a time: at 500 streams x 50 lines/s
it stays far from a core. Prints one JSON object; loopback only; every loop ends by time.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import selectors
import socket
import sys
import time
from typing import Any

LENGTH_RE = re.compile(rb"\r\ncontent-length: *(\d+)")


class Exchange:
    """One connection and the response being read on it (kept whole: they are small)."""

    def __init__(self, request: bytes, started: float) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request, self.started = request, started  # of the wave (chat) or request (get)
        self.connected_at: float | None = None
        self.first_line_at: float | None = None
        self.done_at: float | None = None
        self.outbox, self.data, self.outcome, self.head = b"", b"", "", b""

    def start(self, selector: selectors.BaseSelector, port: int) -> None:
        """Begin connecting."""
        if (code := self.sock.connect_ex(("127.0.0.1", port))) not in (0, errno.EINPROGRESS):
            raise OSError(code, "connect failed")
        selector.register(self.sock, selectors.EVENT_WRITE, self)

    def step(self, selector: selectors.BaseSelector, events: int, now: float) -> bool:
        """Go on with whatever the socket allows; True once the response is complete or the
        server closed the connection."""
        if events & selectors.EVENT_WRITE:
            if self.connected_at is None:
                if error := self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise OSError(error, "connect failed")
                self.connected_at, self.outbox = now, self.request
            if self.send():
                selector.modify(self.sock, selectors.EVENT_READ, self)
            return False
        if not (data := self.sock.recv(65536)):
            return True
        self.data += data
        if self.first_line_at is None and b"}\n" in self.data[-len(data) - 1 :]:
            self.first_line_at = now  # an NDJSON line ends (never in the head or chunk sizes)
        return self.complete()

    def send(self) -> bool:
        """Send what the socket takes of the request; True when all of it went."""
        while self.outbox:
            try:
                self.outbox = self.outbox[self.sock.send(self.outbox) :]
            except BlockingIOError:
                return False
        return True

    def complete(self) -> bool:
        """Whether `data` holds a whole response (Content-Length or chunked)."""
        if not self.head and (end := self.data.find(b"\r\n\r\n")) >= 0:
            self.head = self.data[: end + 4].lower()
        if not self.head:
            return False
        if b"\r\ntransfer-encoding: chunked" in self.head:
            return self.data.endswith(b"\r\n0\r\n\r\n")
        length = LENGTH_RE.search(self.head)
        return length is not None and len(self.data) >= len(self.head) + int(length.group(1))

    def status(self) -> int:
        """The response's status, 0 before its head came."""
        return int(self.head[9:12]) if self.head[9:12].isdigit() else 0

    def body(self) -> bytes:
        """The body so far, chunks joined."""
        rest = self.data[len(self.head) :]
        if b"\r\ntransfer-encoding: chunked" not in self.head:
            return rest
        body, pos = b"", 0
        while (end := rest.find(b"\r\n", pos)) > pos:
            size = int(rest[pos:end].split(b";")[0], 16)
            body, pos = body + rest[end + 2 : end + 2 + size], end + 4 + size
        return body

    def report(self) -> dict[str, Any]:
        """Timings (s from the wave's start), status and outcome of a chat stream."""
        times = {"connect_s": self.connected_at, "first_line_s": self.first_line_at}
        times["done_s"] = self.done_at
        since = {k: None if at is None else round(at - self.started, 6) for k, at in times.items()}
        return {**since, "status": self.status(), "outcome": self.outcome}

    def close(self, selector: selectors.BaseSelector) -> None:
        """Forget the connection."""
        selector.unregister(self.sock)
        self.sock.close()


def errno_name(exc: OSError) -> str:
    """ECONNREFUSED and the like."""
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def chat_outcome(ex: Exchange) -> str:
    """What a finished (or closed) chat exchange amounted to."""
    lines = [line for line in ex.body().split(b"\n") if line.strip()]
    try:
        last = json.loads(lines[-1]) if lines else {}
    except ValueError:
        last = {}
    last, status = last if isinstance(last, dict) else {}, ex.status()
    if status == 503 and last.get("code") == "over_capacity":
        return "over_capacity"
    if status not in (0, 200):
        return f"http_{status}:{last['code']}" if last.get("code") else f"http_{status}"
    if not ex.complete():
        return "closed_early"
    if last.get("done") is True:
        return "ok"
    return "error_line" if "error" in last else "bad_last_line"


def run_chat(port: int, streams: int, message: str, timeout: float) -> dict[str, Any]:
    """One wave of `streams` concurrent chat requests; per-stream timings and outcomes."""
    body = json.dumps({"message": message}).encode()
    request = (
        b"POST /deepseek_chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    selector, started = selectors.DefaultSelector(), time.monotonic()
    exchanges = [Exchange(request, started) for _ in range(streams)]
    pending = set()
    for ex in exchanges:
        try:
            ex.start(selector, port)
            pending.add(ex)
        except OSError as exc:
            ex.outcome = f"connect_error:{errno_name(exc)}"
            ex.sock.close()
    while pending and time.monotonic() < started + timeout:
        for key, events in selector.select(timeout=0.5):
            ex, now = key.data, time.monotonic()
            try:
                if not ex.step(selector, events, now):
                    continue
                ex.done_at, ex.outcome = now, chat_outcome(ex)
            except ConnectionResetError:
                ex.outcome = "reset"
            except OSError as exc:
                ex.outcome = f"error:{errno_name(exc)}"
            ex.close(selector)
            pending.discard(ex)
    for ex in pending:
        ex.outcome = "timeout"
        ex.close(selector)
    selector.close()
    return {"streams": [ex.report() for ex in exchanges], "wall_s": time.monotonic() - started}


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

    def open_one() -> None:
        ex = Exchange(request, time.monotonic())
        try:
            ex.start(selector, port)
            live.add(ex)
        except OSError:
            errors["connect"] += 1
            ex.sock.close()

    for _ in range(connections):
        open_one()
    while live and time.monotonic() < stop_at + 5:
        for key, events in selector.select(timeout=0.5):
            ex, now = key.data, time.monotonic()
            try:
                if not ex.step(selector, events, now):
                    continue
                if not ex.complete():
                    raise ConnectionResetError("closed before the whole response")
                latencies.append(now - ex.started)
                errors["status"] += not 200 <= ex.status() < 400
                if now < stop_at and b"\r\nconnection: close" not in ex.head:
                    ex.data, ex.head, ex.started, ex.outbox = b"", b"", now, ex.request
                    ex.send()  # small: the socket takes it at once
                    continue
            except OSError:
                errors["read" if ex.connected_at else "connect"] += 1
            ex.close(selector)
            live.discard(ex)
            if now < stop_at:
                open_one()
    for ex in live:
        ex.close(selector)
    selector.close()
    elapsed = min(time.monotonic(), stop_at) - started
    latencies.sort()

    def ms(pct: float) -> float:
        rank = int(max(1, -(-len(latencies) * pct // 100)))
        return latencies[min(len(latencies), rank) - 1] * 1000 if latencies else 0.0

    return {
        "requests": len(latencies), "duration_s": elapsed,
        "rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
        **{f"p{pct}_ms": ms(pct) for pct in (50, 90, 99)}, "max_ms": ms(100), "errors": errors,
    }  # fmt: skip


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
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
