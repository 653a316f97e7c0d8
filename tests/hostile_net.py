"""Network helpers for the hostile tests: the server's own stats, rude peers, trickling clients."""

from __future__ import annotations

import contextlib
import re
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

from tests.helpers import Server, SilentTcpServer, wait_until

STATS_RE = re.compile(r"(\w+)=(-?\d+)")


def server_stats(server: Server) -> dict[str, int]:
    """Send SIGUSR1 and return the numbers of the `stats ...` line the server logs."""
    before = server.log_text().count(" stats ")
    server.signal(signal.SIGUSR1)
    wait_until(lambda: server.log_text().count(" stats ") > before, 15, what="the stats line")
    line = [line for line in server.logs if " stats " in line][-1]
    return {key: int(value) for key, value in STATS_RE.findall(line.split(" stats ", 1)[1])}


class ClosingTcpServer(SilentTcpServer):
    """A loopback TCP server that accepts each connection and closes it at once, unanswered."""

    def _took(self, conn: socket.socket) -> None:
        """Hang up at once; the closed socket is kept only to be counted."""
        conn.close()
        self.accepted.append(conn)


@dataclass
class Trickler:
    """One connection that sends its bytes one at a time and notes when the server hangs up."""

    sock: socket.socket
    data: bytes
    opened_at: float
    sent: int = 0
    answer: bytes = b""
    closed_at: float | None = None  # when the server closed the connection (EOF or reset)


@dataclass
class TrickleAttack:
    """Many slow clients driven by one thread: a byte per client every `interval` seconds."""

    port: int
    interval: float = 0.1
    clients: list[Trickler] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def open(self, count: int, prefix: bytes, trickle: bytes) -> list[Trickler]:
        """Open `count` connections that send `prefix` at once and then `trickle` bytewise."""
        opened = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if prefix:
                sock.sendall(prefix)
            sock.setblocking(False)
            opened.append(Trickler(sock, trickle, time.monotonic()))
        self.clients.extend(opened)
        return opened

    def start(self) -> None:
        """Start the thread that trickles and watches every client."""
        self._thread = threading.Thread(target=self._run, name="trickler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            live = [c for c in self.clients if c.closed_at is None]
            if live:
                readable, _, _ = select.select([c.sock for c in live], [], [], 0)
                for client in live:
                    if client.sock in readable:
                        self._read(client)
                    if client.closed_at is None and client.sent < len(client.data):
                        try:
                            client.sent += client.sock.send(
                                client.data[client.sent : client.sent + 1]
                            )
                        except BlockingIOError:
                            pass
                        except OSError:
                            client.closed_at = time.monotonic()
            self._stop.wait(self.interval)

    @staticmethod
    def _read(client: Trickler) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            client.closed_at = time.monotonic()
            return
        if data:
            client.answer += data
        else:
            client.closed_at = time.monotonic()

    def all_closed(self, group: list[Trickler]) -> bool:
        """True once the server closed every connection of the group."""
        return all(client.closed_at is not None for client in group)

    def stop(self) -> None:
        """Stop the thread and close every connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for client in self.clients:
            client.sock.close()


class SlowTcpProxy:
    """A loopback TCP proxy whose answers come late: each chunk from upstream is held back
    `delay` seconds before it is passed on (what goes upstream is passed on at once)."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        """Listen on a free loopback port; one pair of threads per connection."""
        self.upstream = upstream
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        """Pair each client with a fresh upstream connection."""
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream, timeout=10)
            self._sockets += [client, upstream]
            for source, target, delay in ((client, upstream, 0.0), (upstream, client, self.delay)):
                thread = threading.Thread(
                    target=self._pump, args=(source, target, delay), daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, target: socket.socket, delay: float) -> None:
        """Copy bytes one way, each chunk `delay` seconds late, until either side closes."""
        try:
            while data := source.recv(65536):
                if delay and self._stop.wait(delay):
                    return
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting, close every connection, join every thread."""
        self._stop.set()
        # close() alone wakes neither the thread blocked in accept() nor a pump thread
        # blocked in recv(): each would sit out join's timeout. shutdown() wakes them.
        for sock in (self._listener, *self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(5)
