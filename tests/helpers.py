"""Test helpers: a cookie-keeping HTTP client and a real cloudchat server subprocess."""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLOUDCHAT = ROOT / "cloudchat.py"
SCHEMA = ROOT / "schema.sql"
PYTHON = sys.executable

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0
LISTENING_RE = re.compile(r"listening on http://(\S+?):(\d+)")

# Cheap Argon2 parameters: tests only, production defaults are checked by reading them.
CHEAP_ARGON2 = {"ARGON2_TIME_COST": "1", "ARGON2_MEMORY_KIB": "8", "ARGON2_PARALLELISM": "1"}
# Shared servers see every test's traffic from 127.0.0.1, so their limits are out of the way.
HIGH_LIMITS = {
    "RATE_REGISTER_IP": "100000/3600",
    "RATE_REGISTER_EMAIL": "100000/3600",
    "RATE_LOGIN_IP": "100000/600",
    "RATE_LOGIN_IDENTIFIER": "100000/600",
    "RATE_VISITOR_IDS_IP": "100000/3600",
    "RATE_ACCOUNT": "100000/60",
    "RATE_PROFILE": "100000/3600",
    "RATE_TOKEN_IP": "100000/600",
}
# HIGH_LIMITS plus the forgot and chat limits: for tests that hammer every endpoint.
ALL_LIMITS_RAISED = {
    **HIGH_LIMITS,
    "RATE_FORGOT_IP": "100000/3600",
    "RATE_FORGOT_IDENTIFIER": "100000/3600",
    "RATE_CHAT_VISITOR": "100000/60",
    "RATE_CHAT_IP": "100000/60",
}
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "SAMEORIGIN",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}
# Production refuses to start without a key that signs cookies.
TEST_SECRET_KEY = "test-only-secret-key-" + "0" * 32
INVALID_CREDENTIALS = {"ok": False, "error": "Invalid credentials", "code": "invalid_credentials"}
UNAUTHORIZED = {"ok": False, "error": "Unauthorized", "code": "unauthorized"}


def random_hex(n: int = 8) -> str:
    """Return 2*n random hex characters."""
    return secrets.token_hex(n)


def random_email() -> str:
    """Return a fresh, unique, valid email address."""
    return f"u-{random_hex()}@example.com"


def random_phone() -> tuple[str, str]:
    """Return (digits, formatted) for a fresh phone number with a leading +."""
    digits = "1" + "".join(secrets.choice("0123456789") for _ in range(10))
    formatted = f"+{digits[0]}-{digits[1:4]} {digits[4:7]} {digits[7:]}"
    return digits, formatted


def strong_password() -> str:
    """Return a fresh password that meets the contract's rule."""
    return f"Pw-{random_hex(6)}-9x"


def base_env() -> dict[str, str]:
    """Return a minimal environment for a cloudchat process, free of the caller's settings."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOST": "127.0.0.1",
        "PORT": "0",
        "CLOUDCHAT_ENV": "development",
        "LOG_LEVEL": "INFO",
    }
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    env.update(CHEAP_ARGON2)
    return env


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll predicate until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def run_cli(
    args: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run `python cloudchat.py ARGS` to completion and return the finished process."""
    return subprocess.run(
        [PYTHON, str(CLOUDCHAT), *args],
        env=dict(env),
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def parse_set_cookie(header: str) -> tuple[str, str, dict[str, str]]:
    """Split one Set-Cookie value into (name, value, attributes with lower-case keys)."""
    parts = [p.strip() for p in header.split(";")]
    name, _, value = parts[0].partition("=")
    attrs: dict[str, str] = {}
    for part in parts[1:]:
        if part:
            key, _, val = part.partition("=")
            attrs[key.strip().lower()] = val.strip()
    return name.strip(), value.strip().strip('"'), attrs


class SilentTcpServer:
    """A loopback TCP server that accepts connections and never sends a byte (a hung peer)."""

    def __init__(self) -> None:
        """Listen on an ephemeral loopback port and accept in a background thread."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        """Accept and hold connections until closed."""
        while not self._closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._took(conn)

    def _took(self, conn: socket.socket) -> None:
        """Keep an accepted connection open (a hung peer)."""
        self.accepted.append(conn)

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closing.set()
        self._thread.join(5)
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@dataclass
class Response:
    """A finished HTTP answer."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes
    elapsed: float

    def header(self, name: str) -> str | None:
        """Return one header value or None."""
        return self.headers.get(name)

    def set_cookies(self) -> list[tuple[str, str, dict[str, str]]]:
        """Return every Set-Cookie header, parsed."""
        return [parse_set_cookie(h) for h in self.headers.get_all("Set-Cookie") or []]

    def cookie(self, name: str) -> tuple[str, dict[str, str]] | None:
        """Return (value, attributes) of the named Set-Cookie, or None."""
        for cname, value, attrs in self.set_cookies():
            if cname == name:
                return value, attrs
        return None

    def json(self) -> Any:
        """Decode the body as JSON."""
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self) -> str:
        """Show status and a prefix of the body, for assertion messages."""
        return f"<Response {self.status} {self.body[:300]!r}>"


class Client:
    """A tiny HTTP client with a cookie jar, one connection per request."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str] | None = None) -> None:
        """Remember where to talk to and the headers sent on every request."""
        self.host = host
        self.port = port
        self.headers = dict(headers or {})
        self.cookies: dict[str, str] = {}

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Response:
        """Send one request, update the cookie jar from the answer and return it."""
        send_headers = dict(self.headers)
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            send_headers["Content-Type"] = "application/json"
        send_headers.update(headers or {})
        if self.cookies:
            send_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        started = time.monotonic()
        try:
            conn.request(method, path, body=body, headers=send_headers)
            raw = conn.getresponse()
            data = raw.read()
            response = Response(raw.status, raw.msg, data, time.monotonic() - started)
        finally:
            conn.close()
        for name, value, attrs in response.set_cookies():
            if attrs.get("max-age") == "0" or value == "":
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return response

    def get(self, path: str, **kwargs: Any) -> Response:
        """Send a GET."""
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json_body: Any = None, **kwargs: Any) -> Response:
        """Send a POST, JSON-encoding json_body when given."""
        return self.request("POST", path, json_body=json_body, **kwargs)

    def register(self, email: str, password: str, **extra: Any) -> Response:
        """POST /auth/register."""
        return self.post("/auth/register", {"email": email, "password": password, **extra})

    def login(self, identifier: str, password: str) -> Response:
        """POST /auth/login."""
        return self.post("/auth/login", {"identifier": identifier, "password": password})

    def me(self) -> Response:
        """GET /auth/me."""
        return self.get("/auth/me")


@dataclass
class Server:
    """A running `python cloudchat.py` subprocess and what it logged."""

    setup: str
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    logs: list[str] = field(default_factory=list)
    returncode: int | None = None
    _reader: threading.Thread | None = None

    def start(self, timeout: float = START_TIMEOUT) -> Server:
        """Start the process and wait for its `listening on` line."""
        self.proc = subprocess.Popen(
            [PYTHON, str(CLOUDCHAT)],
            env=self.env,
            cwd=str(self.workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.logs):
                match = LISTENING_RE.search(line)
                if match:
                    self.port = int(match.group(2))
                    return self
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise AssertionError(
                    f"cloudchat exited with {self.proc.returncode} before listening:\n"
                    + self.log_text()
                )
            time.sleep(0.02)
        self.stop()
        raise AssertionError(f"no 'listening on' line within {timeout}s:\n" + self.log_text())

    def _read(self) -> None:
        """Collect the process output line by line."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.logs.append(line.rstrip("\n"))

    def log_text(self) -> str:
        """Return everything logged so far."""
        return "\n".join(self.logs)

    def client(self, headers: Mapping[str, str] | None = None) -> Client:
        """Return a new client with an empty cookie jar."""
        return Client("127.0.0.1", self.port, headers)

    def signal(self, signum: int) -> None:
        """Send a signal to the server process."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        """Wait up to timeout for the process to end; return its exit code or None."""
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._reader is not None:
            self._reader.join(2)
        return self.returncode

    def stop(self) -> int | None:
        """Stop the process: SIGTERM, wait with a deadline, then SIGKILL."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(STOP_TIMEOUT) is None:
                self.proc.kill()
                self.wait(STOP_TIMEOUT)
        else:
            self.wait(STOP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.returncode


def logged(
    server: Server, text: str, count: int = 1, *, since: int = 0, timeout: float = 10.0
) -> list[str]:
    """Wait until at least `count` log lines from index `since` on contain text (a line is
    read a moment after the server writes it); those lines. Check what a log must not hold
    only after this."""
    return wait_until(
        lambda: (
            (found := [line for line in server.logs[since:] if text in line])
            and len(found) >= count
            and found
        ),
        timeout,
        what=f"{count} log line(s) with {text!r}",
    )


def sql_rows(server: Server, statement: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Run one statement on a server's own database, committed, and return its rows as
    {column: value}: PostgreSQL when the server has a DATABASE_URL, else its SQLite file;
    %s placeholders for either. The one way tests read or change stored rows."""
    url = server.env.get("DATABASE_URL")
    if url:
        import psycopg2  # only the PostgreSQL setup needs the driver

        pg = psycopg2.connect(url, connect_timeout=5)
        try:
            with pg, pg.cursor() as cur:
                cur.execute(statement, tuple(params) or None)
                return _as_dicts(cur)
        finally:
            pg.close()
    lite = sqlite3.connect(server.env["CLOUDCHAT_DB_PATH"], timeout=10)
    try:
        with lite:
            return _as_dicts(lite.execute(statement.replace("%s", "?"), tuple(params)))
    finally:
        lite.close()


def _as_dicts(cursor: Any) -> list[dict[str, Any]]:
    """A DB-API cursor's remaining rows as {column: value}; none for a statement without."""
    if cursor.description is None:
        return []
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def register_and_login(
    server: Server, *, phone: str | None = None, display_name: str | None = None
) -> tuple[Client, str, str]:
    """Register a fresh user, log a new client in and return (client, email, password)."""
    client = server.client()
    email, password = random_email(), strong_password()
    extra: dict[str, str] = {}
    if phone is not None:
        extra["phone"] = phone
    if display_name is not None:
        extra["display_name"] = display_name
    reg = client.register(email, password, **extra)
    assert reg.status == 201, reg
    login = client.login(email, password)
    assert login.status == 200, login
    return client, email, password


def assert_error(response: Response, status: int, code: str | tuple[str, ...]) -> dict[str, Any]:
    """Assert the JSON error envelope with the given status and code(s); return the body."""
    codes = (code,) if isinstance(code, str) else code
    assert response.status == status, response
    content_type = response.header("Content-Type") or ""
    assert content_type.startswith("application/json"), (content_type, response)
    body = response.json()
    assert isinstance(body, dict), body
    assert body.get("ok") is False, body
    assert isinstance(body.get("error"), str) and body["error"].strip(), body
    assert body.get("code") in codes, body
    return body


# -- a test PKI made with the openssl command line ---------------------------------------


def openssl(workdir: Path, *args: str) -> None:
    """Run the openssl command line in workdir; fail with its stderr."""
    done = subprocess.run(
        ["openssl", *args], cwd=workdir, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(workdir: Path, name: str) -> Path:
    """A self-signed CA certificate (and its key beside it, name.key); its path."""
    openssl(
        workdir,
        "req",
        "-x509",
        *EC_KEY,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN=CloudChat test {name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    return workdir / f"{name}.pem"


def make_server_cert(workdir: Path, ca: str, name: str, san: str) -> tuple[Path, Path]:
    """A server certificate for `san` signed by the CA `ca`; (certificate, key)."""
    openssl(
        workdir,
        "req",
        "-new",
        *EC_KEY,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        "/CN=localhost",
    )
    (workdir / f"{name}.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        encoding="utf-8",
    )
    openssl(
        workdir,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
    )
    return workdir / f"{name}.pem", workdir / f"{name}.key"
