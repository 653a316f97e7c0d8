"""The throughput reference for bench/run.py: gevent's pywsgi with nothing behind it, served
as cloudchat.py serves (TCP_NODELAY on accepted sockets, no access log); every request gets
200 and the same 11-byte JSON body. Prints `listening on http://127.0.0.1:PORT`."""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
from typing import Any  # noqa: E402

import gevent.pywsgi  # noqa: E402


class NoDelayServer(gevent.pywsgi.WSGIServer):
    """pywsgi with Nagle off on accepted sockets, as cloudchat.py's server has."""

    def handle(self, sock: socket.socket, address: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Every request: 200 and the same small JSON body."""
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b'{"ok":true}']


if __name__ == "__main__":
    server = NoDelayServer(("127.0.0.1", 0), app, log=None, backlog=1024)
    server.start()
    print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()
