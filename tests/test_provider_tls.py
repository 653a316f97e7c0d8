"""Provider connections over TLS and the upstream pool, against the real server and a fake
HTTPS provider on loopback (a CA made at run time with the openssl CLI, trusted by the server
through SSL_CERT_FILE): streaming over TLS, a certificate from an unknown CA, session
resumption, the idle pool after a burst (kept, swept, capped), and two units that only show
at scale: idle checks on descriptors above 1023 and TLS reads that take every record in."""

from __future__ import annotations

import http.client
import os
import re
import resource
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import cloudchat
from tests.conftest import ServerFactory
from tests.fakeprovider import FakeProvider, Reply, echo_text
from tests.helpers import Server, assert_error, logged, make_ca, make_server_cert, wait_until
from tests.test_chat import Chat, ChatStream, assert_streamed, chat, chat_env, unique

METRICS_TOKEN = "metrics-" + "tls0k3n" * 6
SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")
CONNECTIONS = "cloudchat_provider_connections_total"
# While a burst's replies wait on their gate, a keep-alive comment this often keeps the
# server's provider read timeout (1 s in chat_env) from firing.
GATE_KEEPALIVE = 0.2


# -- a test CA and the fake provider's certificate -------------------------------------------


@dataclass(frozen=True)
class Pki:
    """The provider's certificate for IP:127.0.0.1, the CA that signed it, and a CA that
    signed nothing the provider serves."""

    ca: Path
    other_ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Two CAs and a leaf certificate for 127.0.0.1 signed by the first (made once a module:
    key generation is the slow part)."""
    workdir = tmp_path_factory.mktemp("pki")
    ca = make_ca(workdir, "ca")
    other = make_ca(workdir, "other-ca")
    cert, key = make_server_cert(workdir, "ca", "provider", "IP:127.0.0.1")
    return Pki(ca, other, cert, key)


def server_context(pki: Pki) -> ssl.SSLContext:
    """The provider's side of TLS: its certificate and key, session tickets on (the default)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert, pki.key)
    return context


@pytest.fixture
def tls_fake(pki: Pki) -> Iterator[FakeProvider]:
    """A fake HTTPS provider of this test's own: its connection counts start at zero."""
    fake = FakeProvider(tls=server_context(pki))
    try:
        yield fake
    finally:
        fake.stop()


def tls_server(make_server: ServerFactory, fake: FakeProvider, ca: Path, **extra: str) -> Server:
    """An embedded server chatting with the fake over HTTPS, trusting `ca` (and only it)."""
    assert fake.url().startswith("https://127.0.0.1:"), fake.url()
    env = chat_env(fake, SSL_CERT_FILE=str(ca), SSL_CERT_DIR=None, METRICS_TOKEN=METRICS_TOKEN)
    env.update(extra)
    return make_server.start("embedded", env)


def connection_counts(server: Server) -> dict[str, float]:
    """cloudchat_provider_connections_total by kind, from GET /metrics."""
    answer = server.client().get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert answer.status == 200, answer
    counts: dict[str, float] = {}
    for line in answer.body.decode().splitlines():
        match = SAMPLE_RE.match(line)
        if match and match.group(1).startswith(CONNECTIONS + "{"):
            kind = re.search(r'kind="([^"]*)"', match.group(1))
            assert kind is not None, line
            counts[kind.group(1)] = float(match.group(2))
    return counts


def burst(
    server: Server,
    fake: FakeProvider,
    count: int,
    deltas: list[str] | None = None,
    delay: float = 0.0,
) -> None:
    """`count` chats at once, each from a new visitor, all in flight together: every reply
    (the echo, or `deltas` `delay` s apart) waits on one gate after its first token, and the
    gate opens only once the provider has all `count` requests (so they surely overlap,
    without guessing at timing). Each answer must stream completely."""
    gate = threading.Event()
    fake.always(Reply(deltas=deltas, delay=delay, gate=gate, gate_keepalive=GATE_KEEPALIVE))
    before = len(fake.requests)
    messages = [unique(f"burst-{n}") for n in range(count)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        try:
            futures = [pool.submit(chat, server, server.client(), m) for m in messages]
            fake.wait_requests(before + count)
        finally:
            gate.set()
        results: list[Chat] = [future.result() for future in futures]
    for message, result in zip(messages, results, strict=True):
        assert_streamed(result, echo_text(message) if deltas is None else "".join(deltas))


def say(server: Server, message: str) -> None:
    """One chat from a new visitor, streamed completely with the fake's echo."""
    assert_streamed(chat(server, server.client(), message), echo_text(message))


# -- chats over TLS --------------------------------------------------------------------------


def test_chat_streams_over_tls(
    make_server: ServerFactory, tls_fake: FakeProvider, pki: Pki
) -> None:
    """A chat through an https provider streams every token and its done line; the one
    connection made a full handshake (nothing to resume yet) and counts as tls_full."""
    srv = tls_server(make_server, tls_fake, pki.ca)
    tls_fake.script(Reply(deltas=["Sec", "ure ", "héllo 🙂"]))
    result = chat(srv, srv.client(), "hi over tls")
    assert_streamed(result, "Secure héllo 🙂")
    assert result.texts == ["Sec", "ure ", "héllo 🙂"]
    (request,) = tls_fake.requests
    assert request.connection.resumed is False
    assert request.connection.handshake_error is None
    assert request.header("authorization") == f"Bearer {srv.env['DEEPSEEK_API_KEY']}"
    counts = connection_counts(srv)
    assert counts.get("tls_full") == 1, counts
    assert counts.get("tls_resumed", 0) == 0 and counts.get("plain", 0) == 0, counts


def test_visitor_leaving_closes_the_tls_connection(
    make_server: ServerFactory, tls_fake: FakeProvider, pki: Pki
) -> None:
    """A visitor who goes away mid-answer: the server drops the provider's TLS connection
    (the provider sees its client go), instead of keeping a half-read one."""
    srv = tls_server(make_server, tls_fake, pki.ca)
    gate = threading.Event()
    tls_fake.script(Reply(deltas=["first", " second"], gate=gate, gate_keepalive=GATE_KEEPALIVE))
    try:
        with ChatStream(srv, srv.client(), unique("leaving")) as stream:
            assert stream.status == 200
            assert stream.next_text() == "first"
        (connection,) = tls_fake.connections()
        wait_until(connection.closed.is_set, 5.0, what="the provider connection to close")
        assert connection.client_closed
    finally:
        gate.set()
    assert tls_fake.open_connections() == 0


def test_untrusted_provider_certificate_is_provider_unreachable(
    make_server: ServerFactory, tls_fake: FakeProvider, pki: Pki
) -> None:
    """A provider certificate from a CA the server does not trust: the handshake fails on
    the server's side, and the visitor gets 503 provider_unreachable, as for any provider
    out of reach; the log says why without a traceback, and no request was sent."""
    srv = tls_server(make_server, tls_fake, pki.other_ca)
    result = chat(srv, srv.client(), unique("untrusted"))
    assert_error(result.response, 503, "provider_unreachable")
    (line,) = logged(srv, "chat provider failed before the first token")
    assert "CERTIFICATE_VERIFY_FAILED" in line, line
    assert "Traceback" not in srv.log_text(), srv.log_text()
    assert tls_fake.requests == []
    wait_until(
        lambda: tls_fake.connections() and tls_fake.connections()[0].closed.is_set(),
        5.0,
        what="the refused connection to close",
    )
    assert tls_fake.connections()[0].handshake_error is not None
    assert tls_fake.connections()[0].resumed is None


def test_new_connections_resume_the_tls_session(
    make_server: ServerFactory, tls_fake: FakeProvider, pki: Pki
) -> None:
    """After one chat (one connection, a full handshake), three at once: one takes the idle
    connection, the two new ones resume the session of the first instead of a full
    handshake; /metrics counts 1 full, 2 resumed, 1 reused."""
    srv = tls_server(make_server, tls_fake, pki.ca)
    say(srv, unique("first"))
    assert tls_fake.accepted_connections() == 1
    burst(srv, tls_fake, 3)
    connections = tls_fake.connections()
    assert len(connections) == 3, connections
    assert [c.resumed for c in connections] == [False, True, True]
    assert [c.requests for c in connections] == [2, 1, 1]
    counts = connection_counts(srv)
    assert counts.get("tls_full") == 1, counts
    assert counts.get("tls_resumed") == 2, counts
    assert counts.get("reused", 0) >= 1, counts
    assert counts.get("plain", 0) == 0, counts


# -- the idle pool after a burst -------------------------------------------------------------


def test_idle_pool_keeps_a_burst_worth_of_connections(
    make_server: ServerFactory, tls_fake: FakeProvider, pki: Pki
) -> None:
    """12 chats at once need 12 connections; all 12 stay open after the burst (more than
    the 4 kept however quiet it is), and a second burst of 12 reuses them: no new one."""
    srv = tls_server(make_server, tls_fake, pki.ca)
    burst(srv, tls_fake, 12)
    assert tls_fake.accepted_connections() == 12
    wait_until(
        lambda: tls_fake.open_connections() == 12,
        5.0,
        what="12 open provider connections",
    )
    burst(srv, tls_fake, 12)
    assert tls_fake.accepted_connections() == 12, [c.requests for c in tls_fake.connections()]
    assert tls_fake.open_connections() == 12
    assert all(c.requests == 2 for c in tls_fake.connections())
    counts = connection_counts(srv)
    assert counts.get("reused") == 12, counts
    assert counts.get("tls_full", 0) + counts.get("tls_resumed", 0) == 12, counts


def test_idle_connections_are_closed_after_idle_seconds(
    make_server: ServerFactory, tls_fake: FakeProvider, pki: Pki
) -> None:
    """CHAT_POOL_IDLE_SECONDS=1: the connections a burst of 8 left idle are closed by the
    server (not by the provider) within a few seconds, with no further request to trigger
    it: the sweeper lets a quiet server hold no descriptors."""
    srv = tls_server(make_server, tls_fake, pki.ca, CHAT_POOL_IDLE_SECONDS="1")
    burst(srv, tls_fake, 8)
    assert tls_fake.accepted_connections() == 8
    assert tls_fake.open_connections() >= 4, "not even the minimum was kept idle"
    wait_until(
        lambda: tls_fake.open_connections() == 0,
        10.0,
        interval=0.1,
        what="every idle provider connection to close",
    )
    assert all(c.client_closed for c in tls_fake.connections()), [
        (c.number, c.client_closed) for c in tls_fake.connections()
    ]


def test_idle_pool_is_capped_by_max_idle(
    make_server: ServerFactory, tls_fake: FakeProvider, pki: Pki
) -> None:
    """CHAT_POOL_MAX_IDLE=2: after a burst of 8 only 2 connections stay open (the others
    closed by the server), and the next chat reuses one of them."""
    srv = tls_server(make_server, tls_fake, pki.ca, CHAT_POOL_MAX_IDLE="2")
    burst(srv, tls_fake, 8)
    assert tls_fake.accepted_connections() == 8
    wait_until(
        lambda: tls_fake.open_connections() == 2,
        5.0,
        what="2 open provider connections",
    )
    closed = [c for c in tls_fake.connections() if c.closed.is_set()]
    assert len(closed) == 6 and all(c.client_closed for c in closed), closed
    say(srv, unique("after"))
    assert tls_fake.accepted_connections() == 8
    assert tls_fake.open_connections() == 2


def test_streams_longer_than_idle_seconds_still_count_as_recent_use(
    make_server: ServerFactory, tls_fake: FakeProvider, pki: Pki
) -> None:
    """CHAT_POOL_IDLE_SECONDS=2 and a burst of 8 answers that each stream for about 3 s
    (a long answer, as a thinking model gives): the 8 connections were in use at once right
    up to the end of the burst, so all 8 are kept for the next burst, which then opens no
    new connection. (The pool must not date "in use at once" from when the peak was reached:
    a burst that lasts longer than CHAT_POOL_IDLE_SECONDS would keep only 4.)"""
    srv = tls_server(make_server, tls_fake, pki.ca, CHAT_POOL_IDLE_SECONDS="2")
    # After the gate, five gaps of 0.6 s between tokens (each within the server's 1 s read
    # timeout): 3 s in all, longer than CHAT_POOL_IDLE_SECONDS.
    burst(srv, tls_fake, 8, deltas=["a", "b", "c", "d", "e", "f"], delay=0.6)
    assert tls_fake.accepted_connections() == 8
    burst(srv, tls_fake, 8)
    assert tls_fake.accepted_connections() == 8, (
        f"{tls_fake.accepted_connections() - 8} new connection(s) for the second burst:"
        " the idle pool kept fewer than the 8 in use at once until just before"
    )


# -- units: idle checks above fd 1023, TLS reads of every record in ---------------------------


def free_fd_from(start: int) -> int:
    """The lowest descriptor number >= start that is not open in this process."""
    for fd in range(start, start + 1000):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    raise AssertionError(f"no free descriptor in {start}..{start + 999}")


@pytest.fixture
def high_fd_pair() -> Iterator[tuple[int, socket.socket]]:
    """A connected socket pair whose reading end is also open as a descriptor above 1023
    (select() cannot watch those); yields (that descriptor, the writing end). The soft
    RLIMIT_NOFILE is raised for it when needed and restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1600
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    reader, writer = socket.socketpair()
    fd = -1
    try:
        fd = free_fd_from(1500)
        os.dup2(reader.fileno(), fd)
        yield fd, writer
    finally:
        if fd >= 0:
            os.close(fd)
        reader.close()
        writer.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_socket_has_input_above_fd_1023(high_fd_pair: tuple[int, socket.socket]) -> None:
    """An idle socket numbered above 1023 has no input; it has once bytes (or the peer's
    EOF) arrive. With select() the idle one counted as input (select raised ValueError),
    so under load every idle provider connection looked closed and was thrown away."""
    fd, writer = high_fd_pair
    assert fd > 1023
    assert cloudchat._socket_has_input(fd) is False
    writer.sendall(b"x")
    wait_until(lambda: cloudchat._socket_has_input(fd), 5.0, what="input on the high fd")
    os.read(fd, 1)
    assert cloudchat._socket_has_input(fd) is False
    writer.shutdown(socket.SHUT_WR)
    wait_until(lambda: cloudchat._socket_has_input(fd), 5.0, what="EOF on the high fd")


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    """One chunk of chunked transfer coding."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class TlsUpstream:
    """A TLS connection over a loopback socket pair: the test writes a provider's bytes
    into the server end (each sendall one TLS record); an HTTPResponse reads the client
    end, as the server's provider connection does."""

    def __init__(self, pki: Pki) -> None:
        """Connect both ends and do the handshake (the server's side in a thread)."""
        raw_server, raw_client = socket.socketpair()
        accepted: list[ssl.SSLSocket] = []
        failed: list[BaseException] = []

        def accept() -> None:
            """The provider's side of the handshake."""
            try:
                accepted.append(server_context(pki).wrap_socket(raw_server, server_side=True))
            except OSError as exc:
                failed.append(exc)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        client_context = ssl.create_default_context(cafile=str(pki.ca))
        raw_client.settimeout(5)
        self.client = client_context.wrap_socket(raw_client, server_hostname="127.0.0.1")
        thread.join(5)
        assert accepted and not failed, failed
        self.server = accepted[0]
        self.responses: list[http.client.HTTPResponse] = []

    def record(self, data: bytes) -> None:
        """Bytes from the provider, as one TLS record."""
        self.server.sendall(data)

    def response(self, head: bytes) -> http.client.HTTPResponse:
        """Send a status line and headers and return the response, begun."""
        self.record(head)
        response = http.client.HTTPResponse(self.client)
        response.begin()
        self.responses.append(response)
        return response

    def whole_records_waiting(self) -> int:
        """Complete TLS records in the client's kernel buffer, not yet read by TLS (a peek
        under the TLS layer at the 5-byte record headers)."""
        poller = select.poll()
        poller.register(self.client.fileno(), select.POLLIN)
        if not poller.poll(0):
            return 0
        raw = socket.socket.recv(self.client, 65536, socket.MSG_PEEK)
        count = pos = 0
        while pos + 5 <= len(raw):
            end = pos + 5 + int.from_bytes(raw[pos + 3 : pos + 5], "big")
            if end > len(raw):
                break
            count, pos = count + 1, end
        return count

    def close(self) -> None:
        """Close the responses' files and both ends."""
        for response in self.responses:
            response.close()
        self.client.close()
        self.server.close()


@pytest.fixture
def tls_upstream(pki: Pki) -> Iterator[TlsUpstream]:
    """A fresh TLS connection standing in for an https provider connection."""
    pair = TlsUpstream(pki)
    try:
        yield pair
    finally:
        pair.close()


def test_tls_body_read_takes_every_record_that_arrived(tls_upstream: TlsUpstream) -> None:
    """Three events sent as three TLS records, all arrived before the read: one read()
    returns all three (a TLS socket's read returns one record; reading on while more has
    arrived is what lets a busy server batch tokens into one write to the visitor)."""
    body = cloudchat.ResponseBody(tls_upstream.response(CHUNKED), tls_upstream.client)
    for piece in (b"one ", b"two ", b"three"):
        tls_upstream.record(chunk(piece))
    wait_until(
        lambda: tls_upstream.whole_records_waiting() >= 3, 5.0, what="3 TLS records to arrive"
    )
    assert body.read() == b"one two three"
    assert not body.complete
    tls_upstream.record(b"0\r\n\r\n")
    assert body.read() == b""
    assert body.complete and body.reusable
