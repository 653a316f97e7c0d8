"""The benchmarks' model provider: tests/fakeprovider.py under gevent, recording off.

    .venv/bin/python bench/provider.py [--tokens 50] [--interval 0.02]

Prints `listening on http://127.0.0.1:PORT` and serves until SIGTERM: every completion gets
`--tokens` tokens `--interval` s apart on a fixed schedule. `GET /stats` answers {"open",
"accepted", "requests", "mode", "misbehaved"} (`open`: client connections open now, the
asking one excluded); `POST /control {"mode": M}` answers the next completions in mode M
(bench/soak.py's provider faults): normal; hang (no answer until the mode changes again);
reset (a TCP reset after 5 tokens); error500 (500 with an OpenAI-style error body); slow
(the first token after 2 s, then tokens 5 x further apart).
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fakeprovider import ClientGone, Connection, FakeProvider, Recorded, Reply

MODES = ("normal", "hang", "reset", "error500", "slow")


class BenchProvider(FakeProvider):
    """The fake provider with a fixed reply per mode, counters and a control endpoint."""

    def __init__(self, tokens: int, interval: float) -> None:
        super().__init__(record=False, watch=False)
        self.tokens, self.interval = tokens, interval
        self.requests_seen = self.misbehaved = 0
        self.mode, self.healed = "normal", threading.Event()
        self.set_mode("normal")

    def set_mode(self, mode: str) -> None:
        """Answer the next completions in `mode`; end the requests held by `hang`."""
        healed, self.healed, self.mode = self.healed, threading.Event(), mode
        deltas, interval = ["tok "] * self.tokens, self.interval
        self.always(
            {
                "normal": Reply(deltas, delay=interval),
                "hang": Reply(mode="hang", gate=self.healed, hold=60.0),
                "reset": Reply(deltas, delay=interval, mode="reset", fail_after=5),
                "error500": Reply(status=500),
                "slow": Reply(deltas, delay=interval * 5, first=2.0),
            }[mode]
        )
        healed.set()

    def stats(self) -> dict[str, Any]:
        """The counters, the asking connection excluded from `open`."""
        return {
            "open": self.open_connections() - 1, "accepted": self.accepted_connections(),
            "requests": self.requests_seen, "mode": self.mode, "misbehaved": self.misbehaved,
        }  # fmt: skip

    def _answer(self, conn: Connection, request: Recorded, reply: Reply) -> bool:
        self.requests_seen += 1
        if request.path == "/stats":
            return _json(conn, 200, self.stats())
        if request.path == "/control":
            mode = request.body.get("mode") if isinstance(request.body, dict) else None
            if mode not in MODES:
                return _json(conn, 400, {"ok": False, "modes": MODES})
            self.set_mode(mode)
            return _json(conn, 200, {"ok": True, "mode": mode})
        self.misbehaved += self.mode != "normal"
        return super()._answer(conn, request, reply)


def _json(conn: Connection, status: int, payload: Any) -> bool:
    body = json.dumps(payload).encode()
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    try:
        conn.sock.sendall(head.encode() + b"\r\n\r\n" + body)
    except OSError as exc:
        raise ClientGone(str(exc)) from exc
    return True


def main() -> int:
    """Serve on a free loopback port until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args()
    provider = BenchProvider(args.tokens, args.interval)
    print(f"listening on {provider.url()}", flush=True)
    threading.Event().wait()  # SIGTERM's default action ends the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
