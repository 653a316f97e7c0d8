"""Connection-level defences: slow clients are cut off, a full server answers 503 quickly."""

from __future__ import annotations

import http.client
import socket
import time

from tests.conftest import ServerFactory
from tests.helpers import wait_until


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or the timeout)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        pass
    return data


def _status_of_test(port: int) -> int:
    """GET /test on a fresh connection; its status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/test")
        return conn.getresponse().status
    finally:
        conn.close()


def test_trickled_headers_are_cut_off(make_server: ServerFactory) -> None:
    server = make_server.start("embedded", {"HEADER_TIMEOUT": "1", "CLIENT_TIMEOUT": "30"})
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"GET /test HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        answer = _read_all(slow, 10)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert waited < 5, waited
    assert _status_of_test(server.port) == 200


def test_idle_keepalive_connection_is_closed(make_server: ServerFactory) -> None:
    server = make_server.start("embedded", {"CLIENT_TIMEOUT": "1"})
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        idle.sendall(b"GET /test HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        answer = _read_all(idle, 10)
        assert b"200 OK" in answer
        assert time.monotonic() - started < 5


def test_over_the_connection_limit_new_clients_get_503(make_server: ServerFactory) -> None:
    server = make_server.start("embedded", {"MAX_CONNECTIONS": "3", "HEADER_TIMEOUT": "30"})
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(b"G")  # a request begun, so each holds a handler

        def refused() -> bytes:
            """A new connection's answer while the three are held."""
            with socket.create_connection(("127.0.0.1", server.port)) as extra:
                extra.sendall(b"GET /test HTTP/1.1\r\nHost: x\r\n\r\n")
                return _read_all(extra, 5)

        answer = wait_until(lambda: b" 503 " in (a := refused()) and a, 10, what="a 503")
        assert b'"code":"over_capacity"' in answer and b"Retry-After: 1" in answer
    finally:
        for sock in held:
            sock.close()
    wait_until(
        lambda: _status_of_test(server.port) == 200,
        10,
        what="service again once the held connections closed",
    )
