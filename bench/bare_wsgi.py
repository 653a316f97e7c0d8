"""The throughput reference for bench/run.py: gevent's pywsgi with nothing behind it.

A WSGI app that answers every request with a fixed 11-byte JSON body, served the way
cloudchat.py serves (gevent pywsgi, TCP_NODELAY on accepted sockets, no access log).
Issue 6 measured this at about 11,000 req/s at 50 keep-alive connections on the box
its targets were set on; bench/run.py runs it in the same run as the server and
reports the server's throughput as a fraction of it, which travels between machines
better than req/s do.

    python bench/bare_wsgi.py    # prints "listening on http://127.0.0.1:PORT"
"""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent.pywsgi  # noqa: E402

BODY = b'{"ok":true}'


class NoDelayServer(gevent.pywsgi.WSGIServer):
    """pywsgi with Nagle off on accepted sockets, as cloudchat.py's server has."""

    def handle(self, sock: socket.socket, address: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Every request: 200 and the same small JSON body."""
    start_response("200 OK", [("Content-Type", "application/json")])
    return [BODY]


def main() -> None:
    """Serve on a free loopback port until terminated."""
    server = NoDelayServer(("127.0.0.1", 0), app, log=None, backlog=1024)
    server.start()
    print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
