"""What run.py, soak.py and abuse.py share: the server (a compiled snapshot, its settings, its
process), the storages, the fake provider, an HTTP client that repeats requests in a thread,
RSS and CPU figures, the server log's findings, the machine, the options and the JSON file.

Loopback only; every process started here is stopped by its PID (PostgreSQL by pg_ctl).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import platform
import py_compile
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
from tests.helpers import make_ca, make_server_cert  # noqa: E402 (after the path)

RAISED_LIMIT = "1000000/60"
RATE_VARIABLES = ("RATE_LOGIN_IP", "RATE_LOGIN_IDENTIFIER", "RATE_REGISTER_IP")
RATE_VARIABLES += ("RATE_REGISTER_EMAIL", "RATE_CHAT_IP", "RATE_CHAT_VISITOR")
PASSWORD = "bench-pass-1"
TRACEBACK = "Traceback (most recent call last)"
HARD_CAP = 100_000  # requests any one Repeater may send, whatever its duration
Request = tuple[str, str, dict | None, int]  # method, path, JSON body, expected status


# --- measuring processes ---------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MB (MiB: kB / 1024), 0 when it is gone."""
    with contextlib.suppress(OSError):
        match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        return int(match.group(1)) / 1024 if match else 0.0
    return 0.0


def settle(pid: int, limit: float = 3.0) -> float:
    """RSS once it stops changing for 200 ms (or after `limit` seconds)."""
    last = rss_mb(pid)
    for _ in range(int(limit / 0.2)):
        time.sleep(0.2)
        if abs((now := rss_mb(pid)) - last) < 0.05:
            return now
        last = now
    return last


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 when it is gone)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


class RssSampler:
    """Samples a process's RSS every 50 ms in a thread; `peak` and `before` after the block."""

    def __init__(self, pid: int) -> None:
        self.pid, self.before, self._stop = pid, rss_mb(pid), threading.Event()
        self.peak, self._thread = self.before, threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    ordered, rank = sorted(values), int(max(1, -(-len(values) * pct // 100)))
    return ordered[min(len(ordered), rank) - 1] if values else None


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds, to 10 us (None stays None)."""
    return None if seconds is None else round(seconds * 1000, 2)


# --- processes: the server, the fake provider, the storages ----------------------------


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process by its PID, SIGKILL it if it outlives the grace period."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoggedProcess:
    """A child whose output goes to a file (a full pipe would block it) and that says
    `listening on http://HOST:PORT` once it serves."""

    def __init__(
        self, argv: list[str], env: dict[str, str], log_path: Path, nofile: int | None = None,
        cwd: Path = ROOT,
    ) -> None:  # fmt: skip
        self.log_path, self._log = log_path, open(log_path, "wb")  # noqa: SIM115 (see stop())

        def limit() -> None:  # in the child, before exec
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, preexec_fn=limit if nofile else None,
        )  # fmt: skip
        self.pid = self.proc.pid
        for _ in range(600):  # 30 s
            if match := re.search(r"listening on http://[^\s:]+:(\d+)", self.log_text()):
                self.port = int(match.group(1))
                return
            if not self.alive():
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{log_path.name} did not start:\n{self.log_text()[-2000:]}")

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stop it by its PID and close the log file."""
        stop_process(self.proc)
        self._log.close()


@dataclasses.dataclass
class Code:
    """The server module measured: a copy (schema.sql beside it) compiled to bytecode, so
    that every run measures the same code while someone edits the file."""

    path: str
    copy: Path
    sha256: str
    git_head: str = "?"
    cloudchat_py_modified: bool = False

    def line(self) -> str:
        """`server PATH sha256 X, git Y [+ local edits]`."""
        edits = " + local edits" if self.cloudchat_py_modified else ""
        return f"server {self.path} sha256 {self.sha256[:12]}, git {self.git_head[:12]}{edits}"


def snapshot(server: Path, workdir: Path) -> Code:
    """Copy and compile the server module (and schema.sql) into workdir/server."""
    (workdir / "server").mkdir()
    copy = workdir / "server" / server.name
    shutil.copyfile(server, copy)
    if (server.parent / "schema.sql").exists():
        shutil.copyfile(server.parent / "schema.sql", copy.parent / "schema.sql")
    py_compile.compile(str(copy), doraise=True)
    code = Code(str(server), copy, hashlib.sha256(copy.read_bytes()).hexdigest())
    git = ["git", "-C", str(ROOT)]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        code.git_head = head.stdout.strip() or "?"
        if server.resolve() == (ROOT / "cloudchat.py").resolve():
            dirty = [*git, "status", "--porcelain", "--", "cloudchat.py"]
            code.cloudchat_py_modified = bool(subprocess.run(dirty, capture_output=True).stdout)
    return code


def server_env(
    storage: dict[str, str], provider_port: int | None = None, raise_limits: bool = True
) -> dict[str, str]:
    """The server's environment: production defaults but for the bench's own settings (the
    fake provider; every RATE_* of RATE_VARIABLES raised unless `raise_limits` is False)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",  # as deploy/systemd/cloudchat.service sets it
        "PYTHONDONTWRITEBYTECODE": "1", "HOST": "127.0.0.1", "PORT": "0", "LOG_LEVEL": "INFO",
        "SHUTDOWN_GRACE_SECONDS": "2",
    }  # fmt: skip
    if provider_port is not None:
        env["DEEPSEEK_API_KEY"] = "bench"
        env["DEEPSEEK_BASE_URL"] = f"http://127.0.0.1:{provider_port}"
    return env | ({name: RAISED_LIMIT for name in RATE_VARIABLES} if raise_limits else {}) | storage


def start_server(
    code: Code, env: dict[str, str], log_path: Path, nofile: int | None = None
) -> LoggedProcess:
    """As deploy/systemd/cloudchat.service starts it: the module from its compiled bytecode
    (compiling the source at every start costs about 5 MiB of RSS)."""
    argv = [sys.executable, "-m", code.copy.stem]
    return LoggedProcess(argv, env, log_path, nofile=nofile, cwd=code.copy.parent)


def start_provider(workdir: Path) -> LoggedProcess:
    """bench/provider.py (tests/fakeprovider.py under gevent) in its own process."""
    argv = [sys.executable, str(BENCH / "provider.py")]
    return LoggedProcess(argv, dict(os.environ), workdir / "provider.log")


@dataclasses.dataclass
class TestCa:
    """A CA made for one run and a certificate for 127.0.0.1 it signed (ECDSA P-256, as
    most large HTTPS front ends serve): the server trusts it through SSL_CERT_FILE, the
    CA path every OpenSSL client reads."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path) -> TestCa:
        """The tests' openssl helpers: a CA, then the provider's key and certificate."""
        ca = make_ca(folder, "test-ca")
        cert, key = make_server_cert(folder, "test-ca", "provider", "IP:127.0.0.1")
        return cls(ca, cert, key)


@dataclasses.dataclass
class StreamProvider:
    """bench/stream_provider.py in its own process: a plain HTTP port and an HTTPS one
    whose certificate the run's test CA signed."""

    process: LoggedProcess
    tls_port: int
    ca: TestCa

    @classmethod
    def start(cls, workdir: Path) -> StreamProvider:
        """A test CA, then the provider (open-file limit 16384: 2,000 streams and more)."""
        ca = TestCa.make(workdir)
        argv = [sys.executable, str(BENCH / "stream_provider.py"), "--cert", str(ca.cert)]
        argv += ["--key", str(ca.key)]
        process = LoggedProcess(argv, dict(os.environ), workdir / "sp.log", nofile=16384)
        tls_port = re.search(r" tls (\d+)", process.log_text())
        assert tls_port is not None
        return cls(process, int(tls_port.group(1)), ca)

    def env(self, kind: str) -> dict[str, str]:
        """The server's provider settings: `tls` (trusting the test CA) or `plain`."""
        port = self.tls_port if kind == "tls" else self.process.port
        scheme = "https" if kind == "tls" else "http"
        return {
            "DEEPSEEK_API_KEY": "bench", "DEEPSEEK_BASE_URL": f"{scheme}://127.0.0.1:{port}",
            "SSL_CERT_FILE": str(self.ca.ca),  # the CA path OpenSSL reads, as in production
        }  # fmt: skip

    def stats(self, kind: str) -> dict[str, int]:
        """The `tls` or `plain` port's counters (asked on the plain port)."""
        return provider_call(self.process.port, "GET", "/stats")[kind]


def provider_call(port: int, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
    """GET /stats or POST /control on the fake provider."""
    answer = Client(port, timeout=5).exchange(method, path, body, keep=False)
    if answer.status != 200:
        raise RuntimeError(f"the provider answered {answer.outcome()}: {answer.body!r}")
    return json.loads(answer.body)


class Storage:
    """Where a server keeps its data: a SQLite file, or (`postgres`) a private PostgreSQL
    cluster with the server's tables; a private redis-server when `redis_options` is given.
    `env` holds the server's storage settings; close() stops and removes them."""

    def __init__(
        self, workdir: Path, code: Code, postgres: bool = False,
        redis_options: tuple[str, ...] | None = None, fsync: bool = True,
    ) -> None:  # fmt: skip
        self.redis: PrivateRedis | None = None
        self.postgres: PrivatePostgres | None = None
        self.env: dict[str, str] = {}
        try:
            if redis_options is not None:
                self.redis = PrivateRedis(workdir, *redis_options)
                self.env["REDIS_URL"] = f"redis://127.0.0.1:{self.redis.port}/0"
            if not postgres:
                self.env["CLOUDCHAT_DB_PATH"] = str(workdir / f"{secrets.token_hex(4)}.db")
                return
            self.postgres = PrivatePostgres(fsync)
            url = f"postgresql://postgres@127.0.0.1:{self.postgres.port}/postgres"
            self.env["DATABASE_URL"] = url
            argv, env = [sys.executable, str(code.copy), "initdb"], server_env(self.env)
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
        except BaseException:
            self.close()
            raise

    @classmethod
    def of_setup(cls, setup: str, workdir: Path, code: Code, fsync: bool = True) -> Storage:
        """Setup embedded: SQLite and the in-process store; postgres: PostgreSQL and Redis."""
        if setup == "embedded":
            return cls(workdir, code)
        return cls(workdir, code, postgres=True, redis_options=(), fsync=fsync)

    def close(self) -> None:
        """Stop the private servers by their PID, delete the PostgreSQL cluster."""
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.remove()


class PrivateRedis:
    """A redis-server of our own on a free loopback port, nothing on disk, started."""

    def __init__(self, workdir: Path, *options: str) -> None:
        self.port, self.paused, self.proc = free_port(), False, None
        self.address = ("127.0.0.1", self.port)
        self.log_path = workdir / f"redis-{self.port}.log"
        self.argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save"]
        self.argv += ["", "--appendonly", "no", "--dir", str(workdir), *options]
        self.start()

    def start(self) -> float:
        """Start it and wait until it answers PING; the seconds that took."""
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches us, and we stop it in order
            )  # fmt: skip
        while time.monotonic() < began + 10 and self.proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(self.address, 1) as ping:
                ping.sendall(b"PING\r\n")
                if ping.recv(64).startswith(b"+PONG"):
                    return time.monotonic() - began
            time.sleep(0.05)
        raise RuntimeError(f"the private redis-server did not start: see {self.log_path}")

    def pause(self, stop: bool = True) -> None:
        """SIGSTOP (the kernel accepts connections, nothing answers); SIGCONT if not `stop`."""
        if self.proc is not None and self.proc.poll() is None and self.paused != stop:
            os.kill(self.proc.pid, signal.SIGSTOP if stop else signal.SIGCONT)
            self.paused = stop

    def stop(self) -> float:
        """SIGTERM by its PID (SIGKILL after 10 s); the seconds that took."""
        began = time.monotonic()
        self.pause(False)
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.proc = None
        return time.monotonic() - began


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb + pg_ctl) on a free loopback port, started.

    initdb refuses to run as root: as root, the cluster belongs to the `postgres` user
    and every pg_ctl runs through `runuser -u postgres --`.
    """

    def __init__(self, fsync: bool = True) -> None:
        self.port, self.fsync = free_port(), "on" if fsync else "off"
        self.user = "postgres" if os.geteuid() == 0 else None
        # Its own folder, outside the (root-only) work folder: the user must reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="cc-bench-pg-"))
        self.data, self.log_path = self.dir / "data", self.dir / "postgres.log"
        try:
            if self.user:
                shutil.chown(self.dir, self.user)
            self._run(["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-N"])
            self.start()
        except BaseException:
            self.remove()
            raise

    def _run(self, args: list[str]) -> float:
        began, prefix = time.monotonic(), ["runuser", "-u", self.user, "--"] if self.user else []
        done = subprocess.run(
            prefix + args, capture_output=True, text=True, timeout=60,
            start_new_session=True,  # the postmaster must not get the terminal's Ctrl-C
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} {args[-1]} failed: {done.stdout}{done.stderr}")
        return time.monotonic() - began

    def start(self) -> float:
        """Start the cluster and wait until it accepts connections; the seconds that took."""
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync={self.fsync}"
        )
        pg_ctl = ["pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options]
        return self._run([*pg_ctl, "-w", "start"])

    def crash(self) -> float:
        """Stop it at once, as a crash or the OOM killer would; the seconds that took."""
        return self._run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def remove(self) -> None:
        """Stop it if it runs (fast shutdown, else SIGKILL to the postmaster's PID); delete."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            try:
                self._run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"])
            except (RuntimeError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                time.sleep(1)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- HTTP: a kept-alive client, one that repeats a request in a thread -------------------

EXCEPTION_KINDS = (  # in this order: RemoteDisconnected is a ConnectionResetError
    (TimeoutError, "timeout"),
    (http.client.RemoteDisconnected, "closed_without_answer"),
    (ConnectionRefusedError, "connection_refused"),
    (ConnectionResetError, "connection_reset"),
    (BrokenPipeError, "broken_pipe"),
    (http.client.IncompleteRead, "incomplete_body"),
)


def exception_outcome(exc: BaseException) -> str:
    """The kind of a failure that left no HTTP status."""
    return next((kind for t, kind in EXCEPTION_KINDS if isinstance(exc, t)), type(exc).__name__)


def error_outcome(status: int, body: bytes) -> str:
    """'<status> <code>' from the JSON error envelope; for /auth/healthz, what is down."""
    code = ""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("code"), str):
            code = parsed["code"]
        elif isinstance(parsed, dict) and "redis" in parsed and "db" in parsed:
            down = [name for name in ("redis", "db") if parsed[name] is False]
            code = "+".join(down) + "_down" if down else ""
    return f"{status} {code}".strip()


def cookie_value(response: http.client.HTTPResponse | None, name: str) -> str | None:
    """The value a response's Set-Cookie headers give `name` (None when they do not)."""
    for header in (response.msg.get_all("Set-Cookie") or ()) if response else ():
        key, _, value = header.split(";", 1)[0].partition("=")
        if key.strip() == name and value:
            return value
    return None


@dataclasses.dataclass
class Answer:
    """A whole request as the client saw it."""

    status: int  # 0 when no answer came
    body: bytes
    response: http.client.HTTPResponse | None
    failure: str  # the kind of connection failure, "" for none
    seconds: float = 0.0

    def outcome(self, expected: int = 200) -> str:
        """'ok' for the expected status, else the failure kind or '<status> <code>'."""
        if self.status == expected:
            return "ok"
        return self.failure or error_outcome(self.status, self.body)


class Client:
    """A kept-alive connection to the server on 127.0.0.1, opened again after a failure.

    A kept-alive connection the server closed while it idled fails before any answer; like
    a browser, `send` tries once more on a fresh one, and calls `retried()`.
    """

    def __init__(self, port: int, timeout: float = 30.0, headers: dict | None = None) -> None:
        self.port, self.timeout, self.headers = port, timeout, headers or {}
        self.conn: http.client.HTTPConnection | None = None

    def retried(self) -> None:
        """Called when a request went again on a fresh connection."""

    def drop(self) -> None:
        """Close the connection (the next request opens another)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(
        self, method: str, path: str, body: dict | None = None, cookies: dict | None = None
    ) -> http.client.HTTPResponse:
        """Send a request and read the status line and headers."""
        data = json.dumps(body).encode() if body is not None else None
        headers = self.headers | ({"Content-Type": "application/json"} if data else {})
        if cookie := "; ".join(f"{k}={v}" for k, v in (cookies or {}).items() if v):
            headers["Cookie"] = cookie
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, self.timeout)
            reused = self.conn.sock is not None
            try:
                self.conn.request(method, path, data, headers)
                return self.conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.drop()
                if not reused or attempt == 2:
                    raise
                self.retried()
            except BaseException:
                self.drop()
                raise
        raise AssertionError("unreachable")

    def exchange(
        self, method: str, path: str, body: dict | None = None, cookies: dict | None = None,
        keep: bool = True,
    ) -> Answer:  # fmt: skip
        """One whole request; the connection stays open unless `keep` is False."""
        began = time.monotonic()
        try:
            response = self.send(method, path, body, cookies)
            answer = Answer(response.status, response.read(), response, "")
        except (OSError, http.client.HTTPException) as exc:
            self.drop()
            answer = Answer(0, b"", None, exception_outcome(exc))
        answer.seconds = time.monotonic() - began
        if not keep:
            self.drop()
        return answer


def post(port: int, path: str, body: dict, expected: int) -> Answer:
    """One POST on a connection of its own; fail loudly unless it answers `expected`."""
    answer = Client(port).exchange("POST", path, body, keep=False)
    if answer.status != expected:
        raise RuntimeError(f"POST {path} answered {answer.outcome()}: {answer.body[:200]!r}")
    return answer


def register_user(port: int, email: str) -> None:
    """Create an account, or fail loudly."""
    post(port, "/auth/register", {"email": email, "password": PASSWORD}, 201)


def login_cookie(port: int, email: str) -> str:
    """Log in; the `cc_auth=...` pair to send as the Cookie header."""
    answer = post(port, "/auth/login", {"identifier": email, "password": PASSWORD}, 200)
    return f"cc_auth={cookie_value(answer.response, 'cc_auth')}"


@dataclasses.dataclass
class Tally:
    """Requests of one or more Repeaters: rate of good ones, latencies (ms), failures."""

    count: int
    failures: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


class Repeater(Client):
    """A thread on a kept-alive connection that sends request(n) for n = 0, 1, ... every
    `every` s (as fast as it can with 0; a late request goes at once), for at most `limit`
    s or until stopped; (start, outcome, seconds) per request in `samples`."""

    def __init__(
        self, port: int, request: Callable[[int], Request], every: float = 0.0,
        limit: float = 120.0, timeout: float = 30.0,
    ) -> None:  # fmt: skip
        super().__init__(port, timeout)
        self.request, self.every, self.limit = request, every, limit
        self.samples: list[tuple[float, str, float]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def pause(self) -> None:
        """Called before each request (the soak parks its probe here for its quiet points)."""

    def _loop(self) -> None:
        moment = began = time.monotonic()
        for n in range(HARD_CAP):
            if self.stopped.wait(max(0.0, moment - time.monotonic())):
                break
            if moment >= began + self.limit:
                break
            self.pause()
            method, path, body, expected = self.request(n)
            answer = self.exchange(method, path, body)
            start = time.monotonic() - answer.seconds
            self.samples.append((start, answer.outcome(expected), answer.seconds))
            moment = max(moment + self.every, time.monotonic())
        self.drop()

    def __enter__(self) -> Repeater:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(60)

    def slow(self, origin: float, over_ms: float = 50.0) -> list[tuple[float, float]]:
        """(s after `origin`, latency ms) of every request slower than `over_ms`."""
        slow = [(t, s * 1000) for t, _, s in self.samples if s * 1000 > over_ms]
        return [(round(t - origin, 3), round(ms, 1)) for t, ms in slow]


def health_probe(port: int, every: float = 0.05, limit: float = 120.0) -> Repeater:
    """GET /auth/healthz every 50 ms on its own connection, on a fixed schedule."""
    return Repeater(port, lambda _: ("GET", "/auth/healthz", None, 200), every, limit)


def tally(
    repeaters: list[Repeater], seconds: float, since: float = 0.0, until: float = float("inf"),
    good_only: bool = False,
) -> Tally:  # fmt: skip
    """The samples begun in [since, until): count, failures, good ones per second over
    `seconds`, latency percentiles (of the good ones with `good_only`)."""
    samples = [s for r in repeaters for s in r.samples if since <= s[0] < until]
    good = [s for _, outcome, s in samples if outcome == "ok"]
    latencies = good if good_only else [s for _, _, s in samples]
    return Tally(
        len(samples), len(samples) - len(good), len(good) / max(seconds, 1e-9),
        ms(percentile(latencies, 50)), ms(percentile(latencies, 99)),
        ms(max(latencies, default=None)),
    )  # fmt: skip


# --- the server log, reporting, the command line ---------------------------------------


@dataclasses.dataclass
class LogFacts:
    """What a server log says; `exit_code` and `shutdown_s` once the soak stopped it."""

    lines: int
    tracebacks: int
    traceback_excerpts: list[str]  # the first three
    error_lines: int
    status_500_lines: int
    status_5xx_by_route: dict[str, int]
    complaints: dict[str, int]  # WARNING/ERROR/CRITICAL lines by kind
    exit_code: int | None = None
    shutdown_s: float = 0.0

    @classmethod
    def read(cls, text: str, top: int = 25) -> LogFacts:
        """The complaints with ids, numbers and object addresses blanked out so that like
        lines add up."""
        lines = text.splitlines()
        starts = [i for i, line in enumerate(lines) if TRACEBACK in line][:3]
        requests = re.findall(r" cloudchat: ([A-Z]+) (\S+) (5\d\d) [\d.]+ms rid=", text)
        statuses = Counter(" ".join(request) for request in requests)
        complaints = Counter(
            re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+(\.\d+)?", "#", re.sub("0x[0-9a-f]+", "0x", c))
            for c in re.findall(r" (?:WARNING|ERROR|CRITICAL) (.*)", text)
        )
        return cls(
            len(lines), text.count(TRACEBACK),
            ["\n".join(lines[max(0, i - 1) : i + 25]) for i in starts],
            len(re.findall(r" (?:ERROR|CRITICAL) ", text)),
            sum(n for key, n in statuses.items() if key.endswith(" 500")),
            dict(statuses.most_common()), dict(complaints.most_common(top)),
        )  # fmt: skip


def say(who: str, text: str) -> None:
    """Progress on stderr (tables go to stdout)."""
    print(f"[{who}] {text}", file=sys.stderr, flush=True)


def text_table(rows: list[tuple[str, ...]], aligns: str, rule: bool = True) -> list[str]:
    """Fixed-width lines: `aligns` has l (left), r (right) or - (as is, last column only)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(aligns))]
    out = []
    for row in rows:
        cells = [
            cell if how == "-" else cell.ljust(width) if how == "l" else cell.rjust(width)
            for cell, how, width in zip(row, aligns, widths, strict=True)
        ]
        out.append("  ".join(cells).rstrip())
        if rule and len(out) == 1:
            out.append("-" * len(out[0]))
    return out


@dataclasses.dataclass
class Machine:
    """What the figures were measured on."""

    nproc: int
    cpu_model: str
    python: str
    loadavg_at_start: tuple[float, float, float]
    wrk: str

    @classmethod
    def now(cls) -> Machine:
        """This machine, now."""
        model = wrk = ""
        with contextlib.suppress(OSError):
            found = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
            model = found.group(1).strip() if found else ""
        if shutil.which("wrk"):
            done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
            wrk = (done.stdout + done.stderr).splitlines()[0] if done.stdout else ""
        return cls(os.cpu_count() or 1, model, platform.python_version(), os.getloadavg(), wrk)

    def line(self) -> str:
        """The end of the header line."""
        load = self.loadavg_at_start[0]
        machine = f"{self.nproc} x {self.cpu_model}, Python {self.python}"
        return f"{machine}, load average at start {load:.2f}; MB = MiB"


def common_options(parser: argparse.ArgumentParser, setup: str) -> None:
    """--setup, --json, --env, --keep-logs, --server."""
    add = parser.add_argument
    add("--setup", choices=("embedded", "postgres"), default=setup)
    add("--json", type=Path, help="where to write every figure (default: bench/results/)")
    add("--env", action="append", default=[], metavar="NAME=VALUE", help="an extra setting")
    add("--keep-logs", type=Path, help="copy the logs to this folder")
    add("--server", type=Path, default=ROOT / "cloudchat.py", help="schema.sql beside it")


def parse_env(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """--env NAME=VALUE items as a dict, or a usage error."""
    extra = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            parser.error(f"--env {item!r} is not NAME=VALUE")
        extra[name] = value
    return extra


def keep_log(folder: Path | None, source: Path, name: str) -> None:
    """Copy a log into the --keep-logs folder, if there is one."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(source, folder / name)


def write_json(out: Path, record: dict[str, Any]) -> None:
    """The JSON file (dataclasses as objects, paths as strings); says where it went."""

    def plain(value: Any) -> Any:
        is_record = dataclasses.is_dataclass(value) and not isinstance(value, type)
        return dataclasses.asdict(value) if is_record else str(value)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=plain))
    print(f"figures written to {out}")
