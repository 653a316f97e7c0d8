"""What run.py, soak.py and abuse.py share: processes, storage, HTTP calls, RSS, the provider.

Loopback only; every process started here is stopped by its PID (PostgreSQL by pg_ctl).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_MARKER = "cloudchat-bench:claimed-by"
RAISED_LIMIT = "1000000/60"
RATE_VARIABLES = ("RATE_LOGIN_IP", "RATE_LOGIN_IDENTIFIER", "RATE_REGISTER_IP")
RATE_VARIABLES += ("RATE_REGISTER_EMAIL", "RATE_CHAT_IP", "RATE_CHAT_VISITOR")
PASSWORD = "bench-pass-1"


# --- measuring processes ---------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MB (MiB: kB / 1024), 0 when it is gone."""
    with contextlib.suppress(OSError):
        match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        return int(match.group(1)) / 1024 if match else 0.0
    return 0.0


def settle(pid: int, limit: float = 3.0) -> float:
    """RSS once it stops changing for 200 ms (or after `limit` seconds)."""
    deadline, last = time.monotonic() + limit, rss_mb(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rss_mb(pid)
        if abs(now - last) < 0.05:
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
        self.pid, self.before = pid, rss_mb(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

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
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), int(max(1, -(-len(ordered) * pct // 100)))) - 1]


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
        timeout: float = 30.0, cwd: Path = ROOT,
    ) -> None:  # fmt: skip
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, preexec_fn=limit,
        )  # fmt: skip
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            match = re.search(r"listening on http://[^\s:]+:(\d+)", self.log_text())
            if match:
                self.port = int(match.group(1))
                return
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


# --- the fake provider and the server ----------------------------------------------------


def start_provider(workdir: Path) -> LoggedProcess:
    """bench/provider.py (tests/fakeprovider.py under gevent) in its own process."""
    argv = [sys.executable, str(BENCH / "provider.py")]
    return LoggedProcess(argv, dict(os.environ), workdir / "provider.log")


def provider_call(port: int, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
    """GET /stats or POST /control on the fake provider."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        status, data, _ = call(conn, method, path, body)
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"the provider answered {status}: {data!r}")
    return json.loads(data)


def server_env(storage: dict[str, str], provider_port: int) -> dict[str, str]:
    """The server's environment: production defaults but for the bench's own settings."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",  # as deploy/systemd/cloudchat.service sets it
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOST": "127.0.0.1",
        "PORT": "0",
        "LOG_LEVEL": "INFO",
        "SHUTDOWN_GRACE_SECONDS": "2",
        "DEEPSEEK_API_KEY": "bench",
        "DEEPSEEK_BASE_URL": f"http://127.0.0.1:{provider_port}",
        **{name: RAISED_LIMIT for name in RATE_VARIABLES},
        **storage,
    }


def snapshot(server: Path, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of the server module (and schema.sql beside it), so that every run measures the
    same code while someone edits the file; (its path, which code it is)."""
    folder = workdir / "server"
    folder.mkdir()
    copy = folder / server.name
    shutil.copyfile(server, copy)
    if (server.parent / "schema.sql").exists():
        shutil.copyfile(server.parent / "schema.sql", folder / "schema.sql")
    identity: dict[str, Any] = {"path": str(server), "sha256": hashlib.sha256(copy.read_bytes())}
    identity["sha256"] = identity["sha256"].hexdigest()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        identity["git_head"] = head.stdout.strip()
        if server.resolve() == (ROOT / "cloudchat.py").resolve():
            dirty = [*git, "status", "--porcelain", "--", "cloudchat.py"]
            changed = subprocess.run(dirty, capture_output=True, text=True).stdout.strip()
            identity["cloudchat_py_modified"] = bool(changed)
    return copy, identity


def identity_line(code: dict[str, Any]) -> str:
    """`server PATH sha256 X, git Y [+ local edits]`."""
    edits = " + local edits" if code.get("cloudchat_py_modified") else ""
    git = code.get("git_head", "?")[:12]
    return f"server {code['path']} sha256 {code['sha256'][:12]}, git {git}{edits}"


def run_initdb(server_path: Path, storage: dict[str, str]) -> None:
    """`python <server> initdb` against the given storage variables, or fail loudly."""
    argv = [sys.executable, str(server_path), "initdb"]
    done = subprocess.run(
        argv, env=server_env(storage, 1), cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")


# --- storage -----------------------------------------------------------------------------


class EmbeddedStorage:
    """A temporary SQLite file per run; the in-process key-value store."""

    name = "embedded"

    def __init__(self, workdir: Path, server_path: Path) -> None:
        self.workdir = workdir

    def prepare(self, run: int) -> dict[str, str]:
        """The storage variables of one run."""
        return {"CLOUDCHAT_DB_PATH": str(self.workdir / f"run{run}.db")}

    def cleanup_run(self) -> None:
        """Nothing outside the work directory to remove."""

    def close(self) -> None:
        """Nothing to release."""


def admin_sql(statement: str) -> None:
    """One statement on the local PostgreSQL's postgres database, autocommit."""
    import psycopg2  # the server's own dependencies, present in its venv

    conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(statement)
    finally:
        conn.close()


class SharedStorage:
    """A throwaway database per run on 127.0.0.1:5432; a claimed DB of the Redis on 6379
    (the first empty one from 15 down, marked) with a key prefix per run."""

    name = "postgres"

    def __init__(self, workdir: Path, server_path: Path) -> None:
        import redis

        self.server_path = server_path
        self.tag = f"{os.getpid()}_{secrets.token_hex(3)}"
        self.database = self.prefix = ""
        self.redis_db, self._redis = 0, None
        for number in range(15, 0, -1):
            client = redis.Redis(host="127.0.0.1", port=6379, db=number, socket_timeout=3)
            if client.dbsize() == 0 and client.set(REDIS_MARKER, self.tag, nx=True, ex=3600):
                if client.dbsize() == 1:
                    self.redis_db, self._redis = number, client
                    break
                client.delete(REDIS_MARKER)
            client.close()
        if self._redis is None:
            raise RuntimeError("no empty Redis database among 1..15 to claim for the bench")

    def prepare(self, run: int) -> dict[str, str]:
        """Create the run's database and its tables; its storage variables."""
        self.database = f"cc_bench_{self.tag}_{run}"
        self.prefix = f"cc-bench-{self.tag}-{run}:"
        admin_sql(f'CREATE DATABASE "{self.database}"')
        storage = {
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{self.database}",
            "REDIS_URL": f"redis://127.0.0.1:6379/{self.redis_db}",
            "REDIS_KEY_PREFIX": self.prefix,
        }
        run_initdb(self.server_path, storage)
        return storage

    def cleanup_run(self) -> None:
        """Drop the run's database and delete the run's Redis keys."""
        if self.database:
            admin_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        if self.prefix and self._redis is not None:
            keys = list(self._redis.scan_iter(match=self.prefix + "*", count=1000))
            for start in range(0, len(keys), 500):
                self._redis.delete(*keys[start : start + 500])
        self.database = self.prefix = ""

    def close(self) -> None:
        """Give the claimed Redis database back."""
        self.cleanup_run()
        if self._redis is not None:
            if self._redis.get(REDIS_MARKER) in (self.tag, self.tag.encode()):
                self._redis.delete(REDIS_MARKER)
            self._redis.close()


class PrivateRedis:
    """A redis-server of our own on a free loopback port, nothing on disk."""

    def __init__(self, workdir: Path, *options: str) -> None:
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is not installed")
        self.port, self.workdir, self.options = free_port(), workdir, options
        self.log_path = workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self.start()

    def url(self) -> str:
        """Its redis:// URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> float:
        """Start it and wait until it answers PING; the seconds that took."""
        began = time.monotonic()
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.workdir), *self.options]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches us, and we stop it in order
            )  # fmt: skip
        while time.monotonic() < began + 10 and self.proc.poll() is None:
            if self.answers():
                return time.monotonic() - began
            time.sleep(0.05)
        raise RuntimeError(f"the private redis-server did not start: {self.log_tail()}")

    def answers(self) -> bool:
        """True if it answers PING within a second."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing is answered."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT."""
        if self.proc is not None and self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> float:
        """SIGTERM by its PID (SIGKILL after 10 s); the seconds that took."""
        began = time.monotonic()
        self.resume()
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.proc = None
        return time.monotonic() - began

    def log_tail(self) -> str:
        """The end of its log."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-1000:]
        return ""


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb + pg_ctl, fsync off) on a free loopback port.

    initdb refuses to run as root: as root, the cluster belongs to the `postgres` user
    and every pg_ctl runs through `runuser -u postgres --`.
    """

    def __init__(self) -> None:
        if not (shutil.which("pg_ctl") and shutil.which("initdb")):
            raise RuntimeError("initdb / pg_ctl are not installed (setup postgres needs them)")
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        # Its own folder, outside the (root-only) work folder: the user must reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="cc-soak-pg-"))
        self.data, self.log_path = self.dir / "data", self.dir / "postgres.log"
        try:
            if self.user:
                shutil.chown(self.dir, self.user)
            self._run(["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-N"])
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, args: list[str], timeout: float = 60) -> float:
        began = time.monotonic()
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        done = subprocess.run(
            prefix + args, capture_output=True, text=True, timeout=timeout,
            start_new_session=True,  # the postmaster must not get the terminal's Ctrl-C
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} {args[-1]} failed: {done.stdout}{done.stderr}")
        return time.monotonic() - began

    def start(self) -> float:
        """Start the cluster and wait until it accepts connections; the seconds that took."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg_ctl = ["pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options]
        return self._run([*pg_ctl, "-w", "-t", "30", "start"])

    def crash(self) -> float:
        """Stop it at once, as a crash or the OOM killer would; the seconds that took."""
        return self._run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def url(self) -> str:
        """The connection URL of its postgres database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def remove(self) -> None:
        """Stop it if it runs (fast shutdown, else SIGKILL to the postmaster's PID); delete."""
        pid = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        if pid is not None:
            try:
                self._run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop"])
            except (RuntimeError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                time.sleep(1)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- HTTP --------------------------------------------------------------------------------


def call(
    conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, http.client.HTTPResponse]:  # fmt: skip
    """One request on a kept-alive connection: status, body, response."""
    data = json.dumps(body).encode() if body is not None else None
    sent = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, data, {**sent, **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read(), response


def post(port: int, path: str, body: dict, expected: int) -> http.client.HTTPResponse:
    """One POST on a connection of its own; fail loudly unless it answers `expected`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        status, data, response = call(conn, "POST", path, body)
    finally:
        conn.close()
    if status != expected:
        raise RuntimeError(f"POST {path} answered {status}: {data[:200]!r}")
    return response


def register_user(port: int, email: str) -> None:
    """Create an account, or fail loudly."""
    post(port, "/auth/register", {"email": email, "password": PASSWORD}, 201)


def login_cookie(port: int, email: str) -> str:
    """Log in; the `cc_auth=...` pair to send as the Cookie header."""
    body = {"identifier": email, "password": PASSWORD}
    return post(port, "/auth/login", body, 200).getheader("Set-Cookie", "").split(";", 1)[0]


# --- reporting and the command line ------------------------------------------------------


def say(who: str, text: str) -> None:
    """Progress on stderr (tables go to stdout)."""
    print(f"[{who}] {text}", file=sys.stderr, flush=True)


def complaint_kinds(log: str) -> Counter[str]:
    """The server log's WARNING/ERROR/CRITICAL lines by kind: ids and numbers blanked out
    so that like lines add up."""
    return Counter(
        re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+(\.\d+)?", "#", match)
        for match in re.findall(r" (?:WARNING|ERROR|CRITICAL) (.*)", log)
    )


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


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = found.group(1).strip() if found else ""
    wrk_version = ""
    if shutil.which("wrk"):
        done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
        wrk_version = (done.stdout + done.stderr).splitlines()[0] if done.stdout else ""
    return {
        "nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
        "kernel": platform.release(), "loadavg_at_start": os.getloadavg(), "wrk": wrk_version,
    }  # fmt: skip


def parse_env(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """--env NAME=VALUE items as a dict, or a usage error."""
    extra = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            parser.error(f"--env {item!r} is not NAME=VALUE")
        extra[name] = value
    return extra
