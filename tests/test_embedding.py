"""Issue 13 point 10: cloudchat:app embedded in gunicorn (-k gevent), as README promises."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakeprovider import FakeProvider, Reply
from tests.helpers import ROOT, Client, base_env, free_port, wait_until

GUNICORN_START = 30.0


class Gunicorn:
    """`gunicorn -k gevent -w N cloudchat:app` on a free loopback port, its output kept."""

    def __init__(self, env: dict[str, str], workers: int, workdir: Path) -> None:
        """Start it and wait until it answers."""
        self.port = free_port()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(workers),
                "-b", f"127.0.0.1:{self.port}", "--chdir", str(ROOT), "cloudchat:app",
            ],
            env={**env, "PYTHONPATH": str(ROOT)},
            cwd=str(workdir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(self._answers, GUNICORN_START, interval=0.2, what="gunicorn to answer")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("gunicorn exited:\n" + self.text())
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def text(self) -> str:
        """Everything it printed so far."""
        return "\n".join(self.lines)

    def client(self, address: str = "127.0.0.1") -> Client:
        """A client with an empty cookie jar, from this (forwarded) address."""
        return Client("127.0.0.1", self.port, {"X-Forwarded-For": address})

    def stop(self) -> None:
        """Stop it by its PID, with a deadline."""
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(2)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def gunicorn_env(tmp_path: Path) -> dict[str, str]:
    """The embedded setup for gunicorn, cheap hashing."""
    return {**base_env(), "CLOUDCHAT_DB_PATH": str(tmp_path / "cc.db")}


@pytest.fixture
def start_gunicorn(tmp_path: Path) -> Iterator[list[Gunicorn]]:
    """Started instances, stopped at the end."""
    started: list[Gunicorn] = []
    yield started
    for instance in started:
        instance.stop()


def test_requests_are_logged_and_the_per_process_store_is_announced(
    gunicorn_env: dict[str, str], start_gunicorn: list[Gunicorn], tmp_path: Path
) -> None:
    """Under gunicorn the app sets up its own log (a request line per request) and says
    loudly that the in-process store's limits belong to each worker."""
    server = Gunicorn(gunicorn_env, 2, tmp_path)
    start_gunicorn.append(server)
    response = server.client().get("/test")
    assert response.status == 200, response
    rid = response.header("X-Request-ID")
    wait_until(lambda: "GET /test 200" in server.text() and rid in server.text(), 10,
               what="the request's log line")  # fmt: skip
    wait_until(lambda: "belong to this worker process only" in server.text(), 10,
               what="the per-process warning")  # fmt: skip


def test_hang_up_is_noticed_under_gunicorn(
    gunicorn_env: dict[str, str],
    start_gunicorn: list[Gunicorn],
    tmp_path: Path,
    fake: FakeProvider,
) -> None:
    """A visitor who hangs up before the first token: the provider connection closes at
    once under gunicorn too (gunicorn.socket is watched), not after CHAT_READ_TIMEOUT."""
    env = {
        **gunicorn_env,
        "DEEPSEEK_API_KEY": "sk-test",
        "DEEPSEEK_BASE_URL": fake.url(),
        "CHAT_READ_TIMEOUT": "30",
    }
    server = Gunicorn(env, 1, tmp_path)
    start_gunicorn.append(server)
    fake.script(Reply(mode="idle"))
    body = json.dumps({"message": "leaving early"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /deepseek_chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        (request,) = fake.wait_requests(1)
    wait_until(request.connection.closed.is_set, 10, what="the provider connection to close")
    assert request.connection.client_closed
