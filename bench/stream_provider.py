"""The chat scenarios' model provider: asyncio, plain HTTP and HTTPS side by side.

    .venv/bin/python bench/stream_provider.py --cert leaf.pem --key leaf.key
                                              [--tokens 50] [--interval 0.02]

Prints `listening on http://127.0.0.1:PORT tls PORT` and serves until SIGTERM. Every completion gets
`--tokens` tokens, the first at once and the rest `--interval` s apart on a fixed schedule,
then a usage chunk and [DONE], chunked and kept alive, as the providers do. `GET /stats` answers
{"plain": S, "tls": S}, S = {"open", "accepted", "full_handshakes", "resumed_handshakes",
"requests"} of that port: `open` counts client connections open now, the asking one
excluded; a handshake is "resumed" when the client offered a TLS session ticket the
provider took (stateless tickets, as OpenSSL issues them by default).

bench/provider.py (the tests' provider under gevent) burns more CPU than the server at 500
streams over TLS; this one stays well below it, so the server's figures are the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from typing import Any

USAGE = {"prompt_tokens": 10, "completion_tokens": 50, "total_tokens": 60}


def sse_chunk(payload: dict[str, Any]) -> bytes:
    """One server-sent event as one HTTP chunk."""
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def token_chunk(text: str) -> bytes:
    return sse_chunk({"object": "chat.completion.chunk", "choices": [{"delta": {"content": text}}]})


class Provider:
    """The counters of one port and its connection handler."""

    def __init__(self, tokens: int, interval: float, ports: dict[str, Provider]) -> None:
        self.tokens, self.interval, self.ports = tokens, interval, ports
        self.open = self.accepted = self.full = self.resumed = self.requests = 0
        self.token = token_chunk("tok ")
        self.tail = (
            sse_chunk({"choices": [], "usage": USAGE}) + b"%x\r\n%s\r\n" % (14, b"data: [DONE]\n\n")
        ) + b"0\r\n\r\n"

    def stats(self, asking: Provider) -> dict[str, int]:
        return {
            "open": self.open - (self is asking), "accepted": self.accepted,
            "full_handshakes": self.full, "resumed_handshakes": self.resumed,
            "requests": self.requests,
        }  # fmt: skip

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests on one connection until the client closes it."""
        self.accepted += 1
        self.open += 1
        tls = writer.get_extra_info("ssl_object")
        if tls is not None:
            self.resumed += tls.session_reused
            self.full += not tls.session_reused
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.requests += 1
                if path == "/stats":
                    body = json.dumps({k: p.stats(self) for k, p in self.ports.items()}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                    writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    continue
                await self.stream(writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, IndexError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def stream(self, writer: asyncio.StreamWriter) -> None:
        """One completion on the fixed schedule."""
        loop = asyncio.get_running_loop()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n" + self.token
        )
        began = loop.time()
        for index in range(1, self.tokens):
            await asyncio.sleep(max(0.0, began + index * self.interval - loop.time()))
            if writer.is_closing():
                raise ConnectionResetError("client gone")
            writer.write(self.token)
        writer.write(self.tail)
        await writer.drain()


async def main_async(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    ports: dict[str, Provider] = {}
    plain = ports["plain"] = Provider(args.tokens, args.interval, ports)
    tls = ports["tls"] = Provider(args.tokens, args.interval, ports)
    servers = [
        await asyncio.start_server(plain.serve, "127.0.0.1", 0, backlog=4096),
        await asyncio.start_server(tls.serve, "127.0.0.1", 0, backlog=4096, ssl=context),
    ]
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    print(f"listening on http://127.0.0.1:{ports[0]} tls {ports[1]}", flush=True)
    await asyncio.Event().wait()  # SIGTERM's default action ends the process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.02)
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
