"""Issue 13 point 1: a stop (SIGTERM) keeps chats alive for SHUTDOWN_GRACE_SECONDS."""

from __future__ import annotations

import signal
import socket
import threading

import pytest

from tests.conftest import ServerFactory
from tests.fakeprovider import FakeProvider, Reply
from tests.helpers import wait_until
from tests.test_chat import ChatStream, chat_env

# An answer that lasts several seconds: 12 tokens, 0.3 s apart (the was 2.8 s).
SLOW = Reply(deltas=[f"t{n} " for n in range(12)], delay=0.3)
SLOW_TEXT = "".join(f"t{n} " for n in range(12))


def test_stream_in_flight_finishes_within_the_grace(
    make_server: ServerFactory, fake: FakeProvider
) -> None:
    """SIGTERM after the first token: the stream still ends with its done line, new
    connections are refused at once, the process exits 0 (before, cut at 1 s, logged 200)."""
    srv = make_server.start(
        "embedded", chat_env(fake, SHUTDOWN_GRACE_SECONDS="10", CHAT_READ_TIMEOUT="10")
    )
    fake.script(SLOW)
    with ChatStream(srv, srv.client(), "slow") as stream:
        assert stream.status == 200
        assert stream.next_text()  # the answer has started
        srv.signal(signal.SIGTERM)
        wait_until(
            lambda: any("no new connections" in line for line in srv.logs),
            timeout=5,
            what="the stop's log line",
        )
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", srv.port), 2):
            pass
        result = stream.finish()
    assert result.text == SLOW_TEXT, result.lines
    assert result.lines[-1].get("done") is True, result.lines[-3:]
    assert srv.wait(15) == 0, srv.log_text()


def test_stream_beyond_the_grace_gets_an_error_line(
    make_server: ServerFactory, fake: FakeProvider
) -> None:
    """A stream still running when the grace ends gets an {"error"} line before the
    connection closes (never a cut without a word), and the process exits 0."""
    srv = make_server.start(
        "embedded", chat_env(fake, SHUTDOWN_GRACE_SECONDS="2", CHAT_READ_TIMEOUT="30")
    )
    gate = threading.Event()  # never set: the provider holds the rest of the answer
    fake.script(Reply(deltas=["first", " never"], gate=gate))
    try:
        with ChatStream(srv, srv.client(), "held") as stream:
            assert stream.next_text() == "first"
            srv.signal(signal.SIGTERM)
            result = stream.finish()
        assert "error" in result.lines[-1], result.lines
        assert "restarting" in result.lines[-1]["error"], result.lines
        assert not [line for line in result.lines if line.get("done")], result.lines
        assert srv.wait(15) == 0, srv.log_text()
        assert "chat cut off at shutdown" in srv.log_text()
    finally:
        gate.set()


def test_idle_keepalive_connection_does_not_hold_the_stop(make_server: ServerFactory) -> None:
    """A kept-alive connection waiting for its next request is closed at the stop, so the
    process does not wait out the whole grace for it."""
    srv = make_server.start("embedded", {"SHUTDOWN_GRACE_SECONDS": "30"})
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"GET /test HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):  # the whole JSON answer; the connection stays open
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        srv.signal(signal.SIGTERM)
        # Well inside the 30 s grace: the idle connection did not keep the process alive.
        assert srv.wait(10) == 0, srv.log_text()
        assert sock.recv(65536) == b""
