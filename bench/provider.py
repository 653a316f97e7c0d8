"""A loopback fake of an OpenAI-compatible chat-completions provider, for bench/run.py.

    .venv/bin/python bench/provider.py [--tokens 50] [--interval 0.02]

Prints `listening on http://127.0.0.1:PORT` and serves until SIGTERM. Any POST whose path
ends in /chat/completions gets 200 and an SSE stream over chunked transfer encoding: one
`data: {"choices":[{"delta":{"content":"tok "}}]}` event per HTTP chunk, `--tokens` of them
`--interval` seconds apart (on a fixed schedule, so 50 x 20 ms take 1 s however busy the
process is), then a usage event and `data: [DONE]`. Connections are kept alive.

`GET /stats` answers {"open", "accepted", "requests", "streaming", "completed", "broken",
"mode", "misbehaved"}: `open` counts the client connections open right now, the /stats
connection excluded, so the harness can tell how many upstream connections the server left
open.

`POST /control` with {"mode": M} changes how the next completions are answered (bench/soak.py
injects provider faults with it); the answer is {"ok": true, "mode": M}. Modes:

    normal   the stream above (the default)
    hang     read the request, answer nothing; the connection is closed, unanswered, when
             the mode changes again (at most HANG_LIMIT seconds later)
    reset    status line, role and RESET_AFTER tokens, then a TCP reset mid-stream
    error500 `500 Internal Server Error` with an OpenAI-style JSON error body, kept alive
    slow     the first token after SLOW_FIRST seconds, then tokens SLOW_FACTOR x further apart

One gevent process (greenlet per connection, listen backlog 4096): 500+ concurrent streams
cost it a fraction of a core. Loopback only; nothing is read from the request but its size.
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import signal
import socket
import struct
import sys
import time
from typing import Any

import gevent
import gevent.event
import gevent.server

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}
MAX_HEADER_BYTES = 65536
MAX_BODY_BYTES = 1 << 20
USAGE = {"prompt_tokens": 12, "completion_tokens": 50, "total_tokens": 62}
MODES = ("normal", "hang", "reset", "error500", "slow")
HANG_LIMIT = 60.0  # seconds a hung request is held at most, whatever the mode does
RESET_AFTER = 5  # tokens sent before the reset
SLOW_FIRST = 2.0  # seconds before the first token in slow mode
SLOW_FACTOR = 5  # slow mode: tokens this many times further apart
ERROR_BODY = b'{"error":{"message":"fake provider failure","type":"server_error"}}'


class _Hangup(Exception):
    """End the connection now (hang and reset modes)."""


class Provider:
    """Counters and the connection handler of the fake provider."""

    def __init__(self, tokens: int, interval: float) -> None:
        self.tokens = tokens
        self.interval = interval
        self.open = 0
        self.accepted = 0
        self.requests = 0
        self.streaming = 0
        self.completed = 0
        self.broken = 0
        self.mode = "normal"
        self.misbehaved = 0  # requests answered in a mode other than normal
        self._mode_changed = gevent.event.Event()
        token_event = {"choices": [{"index": 0, "delta": {"content": "tok "}}]}
        self.token_chunk = _chunk(_event(token_event))
        role_event = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        self.role_chunk = _chunk(_event(role_event))
        usage_event = {"choices": [], "usage": USAGE}
        self.tail = _chunk(_event(usage_event)) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"

    def stats(self) -> dict[str, int]:
        """The counters, the asking connection excluded from `open`."""
        return {
            "open": self.open - 1,
            "accepted": self.accepted,
            "requests": self.requests,
            "streaming": self.streaming,
            "completed": self.completed,
            "broken": self.broken,
            "mode": self.mode,
            "misbehaved": self.misbehaved,
        }

    def set_mode(self, mode: str) -> None:
        """Answer the next completions in `mode`; wake the requests held by `hang`."""
        self.mode = mode
        changed, self._mode_changed = self._mode_changed, gevent.event.Event()
        changed.set()

    def handle(self, sock: Any, address: Any) -> None:
        """Serve requests on one connection until the peer closes it."""
        self.open += 1
        self.accepted += 1
        # As a provider's front end does: without it, a token written while the previous
        # one is unacknowledged waits for the delayed ACK (up to 40 ms) on a reused
        # connection, and the server looks slower than it is.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb")
        try:
            while self._serve_one(sock, rfile):
                pass
        except (OSError, _Hangup):
            pass
        finally:
            self.open -= 1
            rfile.close()
            sock.close()

    def _serve_one(self, sock: Any, rfile: Any) -> bool:
        """Answer one request; False when the connection should end."""
        request_line = rfile.readline(MAX_HEADER_BYTES)
        if not request_line:
            return False
        length = 0
        size = len(request_line)
        while True:
            line = rfile.readline(MAX_HEADER_BYTES)
            size += len(line)
            if not line or size > MAX_HEADER_BYTES:
                return False
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip() or b"0")
        if length > MAX_BODY_BYTES:
            return False
        body = rfile.read(length) if length else b""
        self.requests += 1
        parts = request_line.split()
        method, path = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
        if method == b"GET" and path == b"/stats":
            _answer(sock, 200, json.dumps(self.stats()).encode())
            return True
        if method == b"POST" and path == b"/control":
            return self._control(sock, body)
        if method != b"POST" or not path.endswith(b"/chat/completions"):
            _answer(sock, 404, b'{"error":{"message":"not found"}}')
            return True
        mode = self.mode
        if mode != "normal":
            self.misbehaved += 1
        if mode == "hang":
            # The request is in; no answer comes. When the fault is healed the connection
            # closes unanswered, as a provider's restarted front end would do.
            self._mode_changed.wait(HANG_LIMIT)
            return False
        if mode == "error500":
            _answer(sock, 500, ERROR_BODY)
            return True
        self._stream(sock, mode)
        return True

    def _control(self, sock: Any, body: bytes) -> bool:
        try:
            mode = json.loads(body or b"{}").get("mode")
        except (ValueError, AttributeError):
            mode = None
        if mode not in MODES:
            _answer(sock, 400, json.dumps({"ok": False, "modes": MODES}).encode())
            return True
        self.set_mode(mode)
        _answer(sock, 200, json.dumps({"ok": True, "mode": mode}).encode())
        return True

    def _stream(self, sock: Any, mode: str = "normal") -> None:
        """The SSE answer: role, `tokens` content events on a fixed schedule, usage, [DONE]."""
        self.streaming += 1
        interval = self.interval * (SLOW_FACTOR if mode == "slow" else 1)
        first = SLOW_FIRST if mode == "slow" else 0.0
        try:
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n" + self.role_chunk
            )
            start = time.monotonic() + first
            for index in range(self.tokens):
                if mode == "reset" and index == RESET_AFTER:
                    # SO_LINGER 0: close() sends a RST instead of a FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                    raise _Hangup
                delay = start + index * interval - time.monotonic()
                if delay > 0:
                    gevent.sleep(delay)
                sock.sendall(self.token_chunk)
            sock.sendall(self.tail)
        except OSError:
            self.broken += 1
            raise
        finally:
            self.streaming -= 1
        self.completed += 1


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _answer(sock: Any, status: int, body: bytes) -> None:
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)


def main() -> int:
    """Serve on a free loopback port until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args()
    provider = Provider(args.tokens, args.interval)
    server = gevent.server.StreamServer(("127.0.0.1", args.port), provider.handle, backlog=4096)
    server.max_accept = 1000
    server.start()
    print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, gevent.spawn, server.stop, 1)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
