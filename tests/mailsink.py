"""A real SMTP server on loopback for the tests (aiosmtpd), able to misbehave on demand."""

from __future__ import annotations

import email
import email.policy
import re
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from tests.helpers import free_port

TOKEN_RE = re.compile(r"/reset_password\?token=([A-Za-z0-9_\-]+)")


@dataclass
class Received:
    """One message as the sink accepted it."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage

    def text(self) -> str:
        """The plain-text part."""
        part = self.message.get_body(preferencelist=("plain",))
        assert part is not None, self.message
        return part.get_content()

    def html(self) -> str:
        """The HTML alternative."""
        part = self.message.get_body(preferencelist=("html",))
        assert part is not None, self.message
        return part.get_content()

    def reset_token(self) -> str:
        """The token of the reset link in the plain-text part."""
        match = TOKEN_RE.search(self.text())
        assert match, self.text()
        return match.group(1)


class _Handler:
    """aiosmtpd handler: keeps messages, or answers with a configured failure."""

    def __init__(self, sink: MailSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Accept (or refuse) one message."""
        with self.sink.lock:
            self.sink.attempts += 1
            if self.sink.refusals:
                return self.sink.refusals.pop(0)
            message = email.message_from_bytes(envelope.content, policy=email.policy.default)
            self.sink.messages.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), message)  # type: ignore[arg-type]
            )
            self.sink.tls_used.append(session.ssl is not None)
        return "250 OK"


class MailSink:
    """An SMTP server on 127.0.0.1 that records what it receives."""

    def __init__(self, tls_context: ssl.SSLContext | None = None) -> None:
        """Start the server (with STARTTLS required when a TLS context is given)."""
        self.lock = threading.Lock()
        self.messages: list[Received] = []
        self.tls_used: list[bool] = []
        self.refusals: list[str] = []
        self.attempts = 0
        self.port = free_port()
        kwargs: dict[str, Any] = {}
        if tls_context is not None:
            kwargs = {"tls_context": tls_context, "require_starttls": True}
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port, **kwargs)
        self.controller.start()

    def stop(self) -> None:
        """Stop the server."""
        self.controller.stop()

    def clear(self) -> None:
        """Forget received messages and planned refusals."""
        with self.lock:
            self.messages.clear()
            self.tls_used.clear()
            self.refusals.clear()
            self.attempts = 0

    def refuse_next(self, *answers: str) -> None:
        """Answer the next DATA commands with these replies (e.g. '451 4.3.0 try later')."""
        with self.lock:
            self.refusals.extend(answers)

    def to(self, address: str) -> list[Received]:
        """Messages received so far for an address."""
        with self.lock:
            return [m for m in self.messages if address in m.rcpt_tos]

    def wait_for(self, address: str, count: int = 1, timeout: float = 10.0) -> list[Received]:
        """Poll until `count` messages for the address arrived; return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.to(address)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"{count} mail(s) to {address} did not arrive within {timeout}s")

    def env(self) -> dict[str, str]:
        """Server settings that send plain SMTP to this sink."""
        return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.port), "SMTP_TLS": "0"}


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost made with openssl: (cert, key)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
