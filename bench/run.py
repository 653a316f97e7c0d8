"""CloudChat's benchmark harness: the real server against a fake provider, issue 6's figures.

    .venv/bin/python bench/run.py --setup embedded|postgres [--runs 3] [--json out.json]
                                  [--only floor,me,healthz,register,login,chat,chat_login,nofile]

Each run starts `python cloudchat.py` (PORT=0, LOG_LEVEL=INFO, production Argon2 defaults,
rate limits raised out of the way, its log sent to a file) in the chosen setup: `embedded`
is a temporary SQLite file and the in-process store; `postgres` is a throwaway database on
127.0.0.1:5432 (created, `cloudchat.py initdb`, dropped) plus Redis on 127.0.0.1:6379 (a
database number found empty and claimed with a marker key, a key prefix of its own, every
key removed at the end). The model provider is bench/provider.py on loopback: 50 tokens
20 ms apart. The scenarios:

    floor       RSS of `import gevent, bottle, psycopg2, redis, argon2` + patch_all, and of
                the server after start and after 1,000 GET /auth/me, in MB and x floor
    me          GET /auth/me (logged in) at 50 connections for 5 s (wrk)
    healthz     GET /auth/healthz at 50 connections for 5 s (wrk)
                (either one first measures bench/bare_wsgi.py, a bare pywsgi app, the
                same way: req/s are also given as a fraction of what it manages)
    register    registrations at concurrency 8 for 5 s
    login       logins at concurrency 16 for 5 s, with a GET /auth/healthz probe every
                50 ms on its own connection: rate, latencies, RSS peak over the start
    chat        3 waves of 500 concurrent chat streams (bench/loadgen.py, own process),
                the 50 ms probe running; RSS after each wave, upstream connections left
    chat_login  one wave of 500 streams while 16 workers log in (and the probe runs)
    nofile      500 streams against a fresh server with a low open-file limit (1024 and
                the LimitNOFILE of deploy/systemd/cloudchat.service)

The server's VmRSS is sampled every 50 ms during every scenario. Figures are medians of
`--runs` runs (min-max beside them): the box is shared and noisy, which is also why memory
is given as a ratio to the import floor measured in the same run. A table goes to stdout,
everything (per-run figures and per-wave details) to the JSON file. wrk is used when
installed (`--no-wrk` forces the fallback, bench/loadgen.py's own keep-alive GET load).

Loopback only. Every load loop is bounded in count and time; every process started here
is stopped by its PID; temporary files, the database and the Redis keys are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SERVICE_FILE = ROOT / "deploy" / "systemd" / "cloudchat.service"
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_MARKER = "cloudchat-bench:claimed-by"

SCENARIOS = ("floor", "me", "healthz", "register", "login", "chat", "chat_login", "nofile")
FLOOR_IMPORTS = (
    "import gevent, bottle, psycopg2, redis, argon2; from gevent import monkey;"
    " monkey.patch_all(); import sys; print('ready', flush=True); sys.stdin.read()"
)
RAISED_LIMIT = "1000000/60"
RATE_VARIABLES = (
    "RATE_LOGIN_IP",
    "RATE_LOGIN_IDENTIFIER",
    "RATE_REGISTER_IP",
    "RATE_REGISTER_EMAIL",
    "RATE_CHAT_IP",
    "RATE_CHAT_VISITOR",
)
PASSWORD = "bench-pass-1"
SAMPLE_EVERY = 0.05
LOGIN_USERS = 16
HARD_CAP = 100_000  # requests any one load loop may send, whatever its duration


###############################################################################
# Measuring processes
###############################################################################


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MB (MiB: kB / 1024), 0 when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


def settle(pid: int, limit: float = 3.0) -> float:
    """RSS once it stops changing for 200 ms (or after `limit` seconds)."""
    deadline = time.monotonic() + limit
    last = rss_mb(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rss_mb(pid)
        if abs(now - last) < 0.05:
            return now
        last = now
    return last


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time of every child this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class RssSampler:
    """Samples a process's RSS every 50 ms in a thread; `peak` and `before` after the block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_mb(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


class Profiler:
    """`py-spy record` of a process for the length of a block, when asked for (--profile).

    Writes the collapsed stacks (`<name>.txt`, flamegraph.pl input) and a summary of the
    functions that hold the CPU (`<name>-top.txt`). Sampling perturbs the figures: runs
    with --profile are for finding out why, not for the table.
    """

    def __init__(self, pid: int, folder: Path | None, name: str) -> None:
        self.pid = pid
        self.folder = folder
        self.name = name
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Profiler:
        spy = shutil.which("py-spy")
        if self.folder is None or spy is None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [spy, "record", "--pid", str(self.pid), "--rate", "1000", "--nonblocking"]
        argv += ["--format", "raw", "-o", str(self.folder / f"{self.name}.txt")]
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        time.sleep(0.3)  # let it attach before the load starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None or self.folder is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            stop_process(self._proc, 5)
        stacks = self.folder / f"{self.name}.txt"
        if stacks.exists():
            (self.folder / f"{self.name}-top.txt").write_text(summarize_stacks(stacks))


def summarize_stacks(path: Path, top: int = 30) -> str:
    """Self and inclusive share of each function in py-spy's collapsed stacks.

    Worker threads blocked on the thread pool's queue look busy to py-spy; they are left out.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or "acquire_with_timeout" in stack.rsplit(";", 1)[-1]:
            continue
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    lines = [f"{total} samples at 100 Hz (idle time not sampled)", "", "self:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)] if total else []
    lines += ["", "inclusive:"]
    lines += (
        [f"{100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top * 2)]
        if total
        else []
    )
    return "\n".join(lines) + "\n"


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[min(len(ordered), int(rank)) - 1]


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process by its PID, SIGKILL it if it outlives the grace period."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def import_floor() -> float:
    """RSS of a Python that imported the runtime packages, patched, and waits on stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOR_IMPORTS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # gevent warns that ssl was imported before patching
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the import-floor process did not start")
        return settle(proc.pid)
    finally:
        with contextlib.suppress(OSError):
            proc.communicate("", timeout=10)
        stop_process(proc, 5)


###############################################################################
# The processes under test: fake provider and server
###############################################################################


class LoggedProcess:
    """A child whose output goes to a file (a full pipe would block it) and that says
    `listening on http://HOST:PORT` once it serves."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        nofile: int | None = None,
        timeout: float = 30.0,
        cwd: Path = ROOT,
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        preexec = None
        if nofile is not None:

            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )
        self.pid = self.proc.pid
        self.port = self._wait_for_port(timeout)

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on http://[^\s:]+:(\d+)", self.log_text())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.log_path.name} did not start:\n{self.log_text()[-2000:]}")

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


def provider_stats(port: int) -> dict[str, int]:
    """The fake provider's counters (open connections etc.)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def server_env(storage: dict[str, str], provider_port: int) -> dict[str, str]:
    """The server's environment: production defaults but for the bench's own settings."""
    env = {
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
    }
    env.update(storage)
    return env


###############################################################################
# Storage setups
###############################################################################


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


class PostgresStorage:
    """A throwaway PostgreSQL database per run; a claimed Redis DB with a prefix per run."""

    name = "postgres"

    def __init__(self, workdir: Path, server_path: Path) -> None:
        import psycopg2  # the server's own dependencies, present in its venv
        import redis

        self._psycopg2 = psycopg2
        self.workdir = workdir
        self.server_path = server_path
        self.tag = f"{os.getpid()}_{secrets.token_hex(3)}"
        self.database = ""
        self.prefix = ""
        self.redis_db: int | None = None
        self._redis: Any = None
        for number in range(15, 0, -1):
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number, socket_timeout=3)
            if client.dbsize() == 0 and client.set(REDIS_MARKER, self.tag, nx=True, ex=3600):
                if client.dbsize() == 1:
                    self.redis_db, self._redis = number, client
                    break
                client.delete(REDIS_MARKER)
            client.close()
        if self._redis is None:
            raise RuntimeError("no empty Redis database among 1..15 to claim for the bench")

    def _admin(self, statement: str) -> None:
        conn = self._psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(statement)
        finally:
            conn.close()

    def prepare(self, run: int) -> dict[str, str]:
        """Create the run's database and its tables; its storage variables."""
        self.database = f"cc_bench_{self.tag}_{run}"
        self.prefix = f"cc-bench-{self.tag}-{run}:"
        self._admin(f'CREATE DATABASE "{self.database}"')
        storage = {
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{self.database}",
            "REDIS_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}",
            "REDIS_KEY_PREFIX": self.prefix,
        }
        run_initdb(self.server_path, storage)
        return storage

    def cleanup_run(self) -> None:
        """Drop the run's database and delete the run's Redis keys."""
        if self.database:
            self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            self.database = ""
        if self.prefix:
            keys = list(self._redis.scan_iter(match=self.prefix + "*", count=1000))
            for start in range(0, len(keys), 500):
                self._redis.delete(*keys[start : start + 500])
            self.prefix = ""

    def close(self) -> None:
        """Give the claimed Redis database back."""
        self.cleanup_run()
        if self._redis is not None:
            if self._redis.get(REDIS_MARKER) in (self.tag, self.tag.encode()):
                self._redis.delete(REDIS_MARKER)
            self._redis.close()


def run_initdb(server_path: Path, storage: dict[str, str]) -> None:
    """`python <server> initdb` against the given storage variables, or fail loudly."""
    done = subprocess.run(
        [sys.executable, str(server_path), "initdb"],
        env=server_env(storage, 1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")


###############################################################################
# HTTP clients: single requests, login and registration load, the health probe
###############################################################################


def call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: dict | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, http.client.HTTPResponse]:
    """One request on a kept-alive connection: status, body, response."""
    data = json.dumps(body).encode() if body is not None else None
    sent = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, data, {**sent, **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read(), response


def register_user(port: int, email: str) -> None:
    """Create an account, or fail loudly."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        status, body, _ = call(
            conn, "POST", "/auth/register", {"email": email, "password": PASSWORD}
        )
    finally:
        conn.close()
    if status != 201:
        raise RuntimeError(f"registration of a bench user failed: {status} {body[:200]!r}")


def login_cookie(port: int, email: str) -> str:
    """Log in; the `cc_auth=...` pair to send as the Cookie header."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        status, body, response = call(
            conn, "POST", "/auth/login", {"identifier": email, "password": PASSWORD}
        )
        cookie = response.getheader("Set-Cookie", "")
    finally:
        conn.close()
    if status != 200 or not cookie:
        raise RuntimeError(f"bench login failed: {status} {body[:200]!r}")
    return cookie.split(";", 1)[0]


class Workers:
    """N threads, each on its own kept-alive connection, repeating one kind of request
    until `stop()` or the deadline; they record (latency, ok) per request."""

    def __init__(
        self, port: int, count: int, make_request: Callable[[int, int], tuple], deadline: float
    ) -> None:
        self.port = port
        self.results: list[tuple[float, float, bool]] = []  # (finished at, latency, ok)
        self.errors: Counter[str] = Counter()
        self._make_request = make_request
        self._deadline = deadline
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(worker,), daemon=True)
            for worker in range(count)
        ]
        self.started = time.monotonic()
        self.stopped = self.started

    def start(self) -> Workers:
        """Start every worker."""
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def _work(self, worker: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sequence = 0
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            if sequence >= HARD_CAP // len(self._threads):
                break
            method, path, body, expected = self._make_request(worker, sequence)
            sequence += 1
            begun = time.monotonic()
            try:
                status, _, _ = call(conn, method, path, body)
                ok = status == expected
                if not ok:
                    with self._lock:
                        self.errors[f"http_{status}"] += 1
            except (OSError, http.client.HTTPException) as exc:
                ok = False
                with self._lock:
                    self.errors[type(exc).__name__] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            finished = time.monotonic()
            with self._lock:
                self.results.append((finished, finished - begun, ok))
        conn.close()

    def stop(self) -> Workers:
        """Ask every worker to finish its request in flight, and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        self.stopped = time.monotonic()
        return self

    def summary(self, prefix: str) -> dict[str, Any]:
        """Rate of successful requests, latency percentiles (ms), failures."""
        elapsed = max(1e-9, self.stopped - self.started)
        good = [latency for _, latency, ok in self.results if ok]
        return {
            f"{prefix}_rps": len(good) / elapsed,
            f"{prefix}_p50_ms": _ms(percentile(good, 50)),
            f"{prefix}_p99_ms": _ms(percentile(good, 99)),
            f"{prefix}_failures": len(self.results) - len(good),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def login_requests(users: list[str]) -> Callable[[int, int], tuple]:
    """Worker i logs in as users[i] again and again (no cookie: a new session each time)."""

    def make(worker: int, _: int) -> tuple:
        email = users[worker % len(users)]
        return "POST", "/auth/login", {"identifier": email, "password": PASSWORD}, 200

    return make


def register_requests(tag: str) -> Callable[[int, int], tuple]:
    """Worker i registers bench-<tag>-r<i>-<n>@example.com, n = 0, 1, ..."""

    def make(worker: int, sequence: int) -> tuple:
        email = f"bench-{tag}-r{worker}-{sequence}@example.com"
        return "POST", "/auth/register", {"email": email, "password": PASSWORD}, 201

    return make


class HealthProbe:
    """GET /auth/healthz every 50 ms on its own connection, on a fixed schedule (a probe
    that stalls is followed by the next one at once); latencies in ms."""

    def __init__(self, port: int, every: float = 0.05, limit: float = 120.0) -> None:
        self.port = port
        self.every = every
        self.latencies: list[float] = []
        self.timeline: list[tuple[float, float]] = []  # (monotonic start, latency ms)
        self.failures = 0
        self._limit = limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, daemon=True)

    def _probe(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        started = time.monotonic()
        tick = 0
        while not self._stop.is_set() and time.monotonic() - started < self._limit:
            begun = time.monotonic()
            try:
                status, _, _ = call(conn, "GET", "/auth/healthz")
                self.failures += status != 200
            except (OSError, http.client.HTTPException):
                self.failures += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.latencies.append((time.monotonic() - begun) * 1000)
            self.timeline.append((begun, self.latencies[-1]))
            tick += 1
            self._stop.wait(max(0.0, started + tick * self.every - time.monotonic()))
        conn.close()

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def slow(self, origin: float, over_ms: float = 50.0) -> list[tuple[float, float]]:
        """(seconds after `origin`, latency ms) of every probe slower than `over_ms`."""
        return [(round(t - origin, 3), round(ms, 1)) for t, ms in self.timeline if ms > over_ms]

    def summary(self, prefix: str) -> dict[str, Any]:
        """Max and p99 latency, probe count and failures."""
        return {
            f"{prefix}_max_ms": max(self.latencies) if self.latencies else None,
            f"{prefix}_p99_ms": percentile(self.latencies, 99),
            f"{prefix}_count": len(self.latencies),
            f"{prefix}_failures": self.failures,
        }


###############################################################################
# Load generators in their own processes: wrk (or loadgen.py get) and loadgen.py chat
###############################################################################


def http_load(
    port: int, path: str, headers: list[str], use_wrk: bool, duration: float
) -> dict[str, Any]:
    """GET `path` at 50 connections for `duration` s: rps, p50/p99 (ms), errors."""
    if use_wrk:
        argv = [
            "wrk",
            "-t1",
            "-c50",
            f"-d{duration:g}s",
            "--timeout",
            "10s",
            "-s",
            str(BENCH / "wrk_report.lua"),
        ]
        for header in headers:
            argv += ["-H", header]
        argv.append(f"http://127.0.0.1:{port}{path}")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
        match = re.search(r"BENCH_JSON (\{.*\})", done.stdout)
        if not match:
            raise RuntimeError(f"wrk gave no summary: {done.stdout}{done.stderr}")
        report = json.loads(match.group(1))
        errors = sum(report[k] for k in ("connect", "read", "write", "status", "timeout"))
        return {
            "requests": report["requests"],
            "rps": report["requests"] / (report["duration_us"] / 1e6),
            "p50_ms": report["p50_us"] / 1000,
            "p99_ms": report["p99_us"] / 1000,
            "max_ms": report["max_us"] / 1000,
            "errors": errors,
            "tool": "wrk",
        }
    argv = [sys.executable, str(BENCH / "loadgen.py"), "get", "--port", str(port)]
    argv += ["--path", path, "--connections", "50", "--duration", str(duration)]
    for header in headers:
        argv += ["--header", header]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    report = json.loads(done.stdout)
    return {
        "requests": report["requests"],
        "rps": report["rps"],
        "p50_ms": report["p50_ms"],
        "p99_ms": report["p99_ms"],
        "max_ms": report["max_ms"],
        "errors": sum(report["errors"].values()),
        "tool": "loadgen.py",
    }


def chat_wave(
    server: LoggedProcess, provider: LoggedProcess, streams: int, timeout: float = 90.0
) -> dict[str, Any]:
    """One wave of concurrent chat streams from loadgen.py; timings, outcomes, RSS, CPU."""
    argv = [sys.executable, str(BENCH / "loadgen.py"), "chat", "--port", str(server.port)]
    argv += ["--streams", str(streams), "--timeout", str(timeout)]
    cpu_server, cpu_provider = cpu_seconds(server.pid), cpu_seconds(provider.pid)
    cpu_children = children_cpu_seconds()
    with RssSampler(server.pid) as rss:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen.py chat failed: {done.stderr[-2000:]}")
    cpu = {
        "server": cpu_seconds(server.pid) - cpu_server,
        "provider": cpu_seconds(provider.pid) - cpu_provider,
        "client": children_cpu_seconds() - cpu_children,
    }
    report = json.loads(done.stdout)
    per_stream = report["streams"]
    outcomes = Counter(stream["outcome"] for stream in per_stream)
    firsts = [s["first_line_s"] for s in per_stream if s["first_line_s"] is not None]
    dones = [s["done_s"] for s in per_stream if s["outcome"] == "ok"]
    connects = [s["connect_s"] for s in per_stream if s["connect_s"] is not None]
    # How many streams were open at once, as the client saw it: accept-queue overflow
    # spreads the connects out, and streams that end early make room for late ones.
    edges = sorted(
        edge
        for s in per_stream
        if s["connect_s"] is not None and s["done_s"] is not None
        for edge in ((s["connect_s"], 1), (s["done_s"], -1))
    )
    open_now = peak_open = 0
    for _, step in edges:
        open_now += step
        peak_open = max(peak_open, open_now)
    time.sleep(0.5)  # let closed upstream connections reach the provider
    return {
        "streams": streams,
        "outcomes": dict(outcomes),
        "ok": outcomes.get("ok", 0),
        "failures": streams - outcomes.get("ok", 0),
        "first_p50_s": percentile(firsts, 50),
        "first_p95_s": percentile(firsts, 95),
        "first_max_s": max(firsts) if firsts else None,
        "last_done_s": max(dones) if dones else None,
        "connect_max_s": max(connects) if connects else None,
        "connect_over_0_5s": sum(1 for c in connects if c > 0.5),
        "peak_concurrent": peak_open,
        "wall_s": report["wall_s"],
        "peak_rss_mb": rss.peak,
        "rss_before_mb": rss.before,
        "rss_after_mb": settle(server.pid),
        "upstream_open": provider_stats(provider.port)["open"],
        "cpu_s": cpu,
    }


###############################################################################
# One run: every scenario against one fresh server
###############################################################################


class Run:
    """One run of the chosen scenarios; `figures` holds its flat results."""

    def __init__(self, number: int, storage: Any, args: argparse.Namespace) -> None:
        self.number = number
        self.storage = storage
        self.args = args
        self.only = set(args.only)
        self.tag = f"{os.getpid()}x{number}x{secrets.token_hex(2)}"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"cc-bench-run{number}-"))
        self.figures: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self.provider: LoggedProcess | None = None
        self.server: LoggedProcess | None = None
        self.env: dict[str, str] = {}

    def say(self, text: str) -> None:
        """Progress on stderr (the table goes to stdout)."""
        print(f"[run {self.number}] {text}", file=sys.stderr, flush=True)

    def execute(self) -> None:
        """Every selected scenario, then stop and clean up whatever it started."""
        try:
            self._execute()
        except Exception as exc:
            tail = self.server.log_text()[-3000:] if self.server is not None else ""
            raise RuntimeError(f"run {self.number} failed: {exc!r}\nserver log:\n{tail}") from exc
        finally:
            for process in (self.server, self.provider):
                if process is not None:
                    process.stop()
            self.storage.cleanup_run()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _execute(self) -> None:
        args = self.args
        if "floor" in self.only:
            self.figures["floor_mb"] = import_floor()
            self.say(f"import floor {self.figures['floor_mb']:.1f} MB")
        self.provider = LoggedProcess(
            [sys.executable, str(BENCH / "provider.py")], dict(os.environ), self.workdir / "p.log"
        )
        storage = self.storage.prepare(self.number)
        self.env = {**server_env(storage, self.provider.port), **args.env}
        self.server = self._start_server("server.log")
        server = self.server
        self.figures["start_mb"] = settle(server.pid)
        owner = f"bench-{self.tag}-me@example.com"
        register_user(server.port, owner)
        cookie = login_cookie(server.port, owner)
        if "floor" in self.only:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            for _ in range(1000):
                status, body, _ = call(conn, "GET", "/auth/me", headers={"Cookie": cookie})
                if status != 200:
                    raise RuntimeError(f"GET /auth/me answered {status}: {body[:200]!r}")
            conn.close()
            self.figures["after_mb"] = settle(server.pid)
            floor = self.figures["floor_mb"]
            self.figures["start_ratio"] = self.figures["start_mb"] / floor
            self.figures["after_ratio"] = self.figures["after_mb"] / floor
            self.say(
                f"server after start {self.figures['start_mb']:.1f} MB, after 1,000 requests"
                f" {self.figures['after_mb']:.1f} MB"
            )
        users = []
        if self.only & {"login", "chat_login"}:
            users = [f"bench-{self.tag}-u{i}@example.com" for i in range(LOGIN_USERS)]
            for email in users:
                register_user(server.port, email)
        if self.only & {"me", "healthz"}:
            self._bare_reference()
        if "me" in self.only:
            self._http_load("me", "/auth/me", [f"Cookie: {cookie}"])
            self.figures["me_ratio"] = self.figures["me_rps"] / self.figures["bare_rps"]
        if "healthz" in self.only:
            self._http_load("hz", "/auth/healthz", [])
            self.figures["hz_ratio"] = self.figures["hz_rps"] / self.figures["bare_rps"]
        if "register" in self.only:
            self._register()
        if "login" in self.only:
            self._login(users)
        if "chat" in self.only:
            self._chat()
        if "chat_login" in self.only:
            self._chat_login(users)
        self._log_counts("log", server)
        if "nofile" in self.only:
            server.stop()
            self.server = None
            for nofile in args.nofile:
                self._nofile(nofile)

    def _profile(self, scenario: str) -> Profiler:
        assert self.server is not None
        name = f"{self.storage.name}-run{self.number}-{scenario}"
        return Profiler(self.server.pid, self.args.profile, name)

    def _start_server(self, log_name: str, nofile: int | None = None) -> LoggedProcess:
        # As deploy/systemd/cloudchat.service starts it: the module from its compiled
        # bytecode (compiling the source at every start costs about 5 MiB of RSS).
        server = self.args.server
        argv = [sys.executable, "-m", server.stem]
        log_path = self.workdir / log_name
        return LoggedProcess(argv, self.env, log_path, nofile=nofile, cwd=server.parent)

    def _http_load(self, prefix: str, path: str, headers: list[str]) -> None:
        assert self.server is not None
        cpu = cpu_seconds(self.server.pid)
        with RssSampler(self.server.pid) as rss, self._profile(prefix):
            report = http_load(self.server.port, path, headers, self.args.wrk, self.args.duration)
        cpu = cpu_seconds(self.server.pid) - cpu
        self.details[prefix] = {**report, "peak_rss_mb": rss.peak, "server_cpu_s": cpu}
        for key in ("rps", "p50_ms", "p99_ms", "errors"):
            self.figures[f"{prefix}_{key}"] = report[key]
        # CPU per request: the figure least disturbed by whatever else the box is doing.
        self.figures[f"{prefix}_cpu_us"] = cpu / max(1, report["requests"]) * 1e6
        self.say(f"GET {path}: {report['rps']:.0f} req/s, p99 {report['p99_ms']:.1f} ms")

    def _bare_reference(self) -> None:
        """req/s of bench/bare_wsgi.py under the same load: what this box allows at all."""
        bare = LoggedProcess(
            [sys.executable, str(BENCH / "bare_wsgi.py")], dict(os.environ), self.workdir / "b.log"
        )
        try:
            report = http_load(bare.port, "/", [], self.args.wrk, self.args.duration)
        finally:
            bare.stop()
        self.details["bare"] = report
        self.figures["bare_rps"] = report["rps"]
        self.say(f"bare gevent WSGI app: {report['rps']:.0f} req/s")

    def _register(self) -> None:
        assert self.server is not None
        deadline = time.monotonic() + self.args.duration
        workers = Workers(self.server.port, 8, register_requests(self.tag), deadline)
        with RssSampler(self.server.pid) as rss, self._profile("register"):
            workers.start()
            time.sleep(self.args.duration)
            workers.stop()
        self.figures.update(workers.summary("reg"))
        self.figures["reg_peak_delta_mb"] = rss.peak - rss.before
        self.details["register_errors"] = dict(workers.errors)
        self.say(f"registrations: {self.figures['reg_rps']:.1f}/s")

    def _login(self, users: list[str]) -> None:
        assert self.server is not None
        deadline = time.monotonic() + self.args.duration
        workers = Workers(self.server.port, LOGIN_USERS, login_requests(users), deadline)
        with (
            RssSampler(self.server.pid) as rss,
            HealthProbe(self.server.port) as probe,
            self._profile("login"),
        ):
            workers.start()
            time.sleep(self.args.duration)
            workers.stop()
        self.figures.update(workers.summary("login"))
        self.figures["login_peak_delta_mb"] = rss.peak - rss.before
        self.figures.update(probe.summary("probe"))
        self.details["login_errors"] = dict(workers.errors)
        self.details["login_slow_probes"] = probe.slow(workers.started)
        self.say(
            f"logins: {self.figures['login_rps']:.1f}/s, probe max"
            f" {self.figures['probe_max_ms'] or 0:.0f} ms"
        )

    def _chat(self) -> None:
        assert self.server is not None and self.provider is not None
        waves = []
        for wave in range(self.args.waves):
            with self._profile(f"chat-wave{wave + 1}"), HealthProbe(self.server.port) as probe:
                wave_start = time.monotonic()
                result = chat_wave(self.server, self.provider, self.args.streams)
            result["probe"] = probe.summary("probe")
            result["slow_probes"] = probe.slow(wave_start)
            waves.append(result)
            self.figures[f"chat_rss_w{wave + 1}_mb"] = result["rss_after_mb"]
            self.say(
                f"chat wave {wave + 1}: {result['ok']}/{result['streams']} ok, first line p95"
                f" {result['first_p95_s'] or 0:.2f} s, last done {result['last_done_s'] or 0:.2f}"
                f" s, peak {result['peak_rss_mb']:.1f} MB"
            )
        self.details["chat_waves"] = waves
        first = waves[0]
        self.figures.update(
            chat_first_p50_s=first["first_p50_s"],
            chat_first_p95_s=_worst(waves, "first_p95_s"),
            chat_last_done_s=_worst(waves, "last_done_s"),
            chat_connect_max_s=_worst(waves, "connect_max_s"),
            chat_connect_late=_worst(waves, "connect_over_0_5s"),
            chat_probe_max_ms=max(w["probe"]["probe_max_ms"] or 0 for w in waves),
            chat_concurrent=min(w["peak_concurrent"] for w in waves),
            chat_failures=sum(w["failures"] for w in waves),
            chat_peak_mb=_worst(waves, "peak_rss_mb"),
            # The first wave warms up (allocator high-water marks, pools); a leak shows
            # as growth after it. With --waves 8 the RSS is flat from wave 3 or 4 on.
            chat_warmup_mb=waves[min(1, len(waves) - 1)]["rss_after_mb"] - waves[0]["rss_after_mb"],
            chat_growth_mb=waves[-1]["rss_after_mb"]
            - waves[min(1, len(waves) - 1)]["rss_after_mb"],
            chat_upstream_open=_worst(waves, "upstream_open"),
            chat_cpu_server_s=statistics.mean(w["cpu_s"]["server"] for w in waves),
            chat_cpu_provider_s=statistics.mean(w["cpu_s"]["provider"] for w in waves),
            chat_cpu_client_s=statistics.mean(w["cpu_s"]["client"] for w in waves),
        )

    def _chat_login(self, users: list[str]) -> None:
        assert self.server is not None and self.provider is not None
        deadline = time.monotonic() + 120
        workers = Workers(self.server.port, LOGIN_USERS, login_requests(users), deadline)
        with HealthProbe(self.server.port) as probe, self._profile("chat_login"):
            workers.start()
            time.sleep(0.5)  # the logins are under way when the wave arrives
            wave_start = time.monotonic()
            result = chat_wave(self.server, self.provider, self.args.streams)
            workers.stop()
        self.details["chat_login_wave"] = result
        self.details["chat_login_slow_probes"] = probe.slow(wave_start)
        self.details["chat_login_errors"] = dict(workers.errors)
        logins = workers.summary("cl_login")
        self.figures.update(
            cl_first_p95_s=result["first_p95_s"],
            cl_last_done_s=result["last_done_s"],
            cl_failures=result["failures"],
            cl_login_rps=logins["cl_login_rps"],
            cl_login_p50_ms=logins["cl_login_p50_ms"],
            cl_probe_max_ms=probe.summary("p")["p_max_ms"],
        )
        self.say(
            f"streams + logins: first line p95 {result['first_p95_s'] or 0:.2f} s, logins"
            f" {logins['cl_login_rps']:.1f}/s"
        )

    def _nofile(self, nofile: int) -> None:
        assert self.provider is not None
        server = self._start_server(f"server-nofile{nofile}.log", nofile=nofile)
        try:
            settle(server.pid)
            result = chat_wave(server, self.provider, self.args.streams)
            answering = False
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
                status, _, _ = call(conn, "GET", "/auth/healthz")
                conn.close()
                answering = status == 200
            log = server.log_text()
            capacity = re.search(r"at most (\d+) client connections", log)
            prefix = f"nf{nofile}"
            self.figures.update(
                {
                    f"{prefix}_ok": result["ok"],
                    f"{prefix}_over_capacity": result["outcomes"].get("over_capacity", 0),
                    f"{prefix}_other_failures": result["failures"]
                    - result["outcomes"].get("over_capacity", 0),
                    f"{prefix}_last_done_s": result["last_done_s"],
                    f"{prefix}_concurrent": result["peak_concurrent"],
                    f"{prefix}_answering": int(answering and server.alive()),
                    f"{prefix}_emfile_lines": log.count("Too many open files"),
                    f"{prefix}_max_connections": int(capacity.group(1)) if capacity else None,
                }
            )
            self._log_counts(prefix, server)
            self.details[f"nofile_{nofile}"] = result
            self.say(
                f"nofile {nofile}: {result['ok']} ok, {result['outcomes']}, answering"
                f" afterwards: {answering}"
            )
        finally:
            server.stop()

    def _log_counts(self, prefix: str, server: LoggedProcess) -> None:
        log = server.log_text()
        self.figures[f"{prefix}_tracebacks"] = log.count("Traceback (most recent call last)")
        self.figures[f"{prefix}_error_lines"] = len(re.findall(r" (?:ERROR|CRITICAL) ", log))
        self.details[f"{prefix}_complaints"] = dict(complaint_kinds(log).most_common(10))
        if self.args.keep_logs:
            self.args.keep_logs.mkdir(parents=True, exist_ok=True)
            target = self.args.keep_logs / f"{self.storage.name}-run{self.number}-{prefix}.log"
            shutil.copyfile(server.log_path, target)


def complaint_kinds(log: str) -> Counter[str]:
    """The server log's WARNING/ERROR/CRITICAL lines by kind: ids and numbers blanked out
    so that like lines add up."""
    return Counter(
        re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+(\.\d+)?", "#", match)
        for match in re.findall(r" (?:WARNING|ERROR|CRITICAL) (.*)", log)
    )


def _worst(waves: list[dict[str, Any]], key: str) -> Any:
    values = [wave[key] for wave in waves if wave[key] is not None]
    return max(values) if values else None


###############################################################################
# The table: what each figure means, its target and the original deployment's value
###############################################################################

# One row per figure: key | label | unit | decimals | target | the original deployment's
# figure (Flask + gunicorn gevent + SQLAlchemy + Flask-Session + openai SDK, one worker).
ROWS_TEXT = """
floor_mb            | 1. import floor RSS                             | MB    | 1 |         | 38.6
start_mb            | 1. server RSS after start                       | MB    | 1 |         | 110
start_ratio         | 1.   after start / floor                        | x     | 2 |         | 2.85
after_mb            | 1. server RSS after 1,000 GET /auth/me          | MB    | 1 |         | 130
after_ratio         | 1.   after 1,000 requests / floor               | x     | 2 | <= 1.25 | 3.37
bare_rps            | 2. bare gevent WSGI app (issue 6: 11,000)       | req/s | 0 |         |
me_rps              | 2. GET /auth/me, 50 connections                 | req/s | 0 | >= 2500 | 556
me_ratio            | 2.   /auth/me / bare app (2,500 / 11,000)       | x     | 2 | >= 0.23 |
me_p50_ms           | 2.   p50                                        | ms    | 1 |         |
me_p99_ms           | 2.   p99                                        | ms    | 1 |         | 362
me_errors           | 2.   errors and non-2xx                         |       | 0 | <= 0    |
me_cpu_us           | 2.   server CPU per request                     | us    | 0 |         |
hz_rps              | 3. GET /auth/healthz, 50 connections            | req/s | 0 | >= 3000 | 781
hz_ratio            | 3.   /auth/healthz / bare app (3,000 / 11,000)  | x     | 2 | >= 0.27 |
hz_p50_ms           | 3.   p50                                        | ms    | 1 |         |
hz_p99_ms           | 3.   p99                                        | ms    | 1 |         |
hz_errors           | 3.   errors and non-2xx                         |       | 0 | <= 0    |
hz_cpu_us           | 3.   server CPU per request                     | us    | 0 |         |
login_rps           | 4. logins, concurrency 16                       | /s    | 1 | >= 27   | 9
login_p50_ms        | 4.   p50                                        | ms    | 0 |         | 1500
login_p99_ms        | 4.   p99                                        | ms    | 0 |         |
login_peak_delta_mb | 4.   peak RSS over the pre-scenario RSS         | MB    | 1 |         | 64
login_failures      | 4.   failures                                   |       | 0 | <= 0    |
reg_rps             | 5. registrations, concurrency 8                 | /s    | 1 |         |
reg_p50_ms          | 5.   p50                                        | ms    | 0 |         |
reg_peak_delta_mb   | 5.   peak RSS over the pre-scenario RSS         | MB    | 1 |         |
reg_failures        | 5.   failures                                   |       | 0 | <= 0    |
probe_max_ms        | 6. 50 ms health probe during 4.: max            | ms    | 1 | <= 50   | 1500
probe_p99_ms        | 6.   p99                                        | ms    | 1 |         |
probe_failures      | 6.   failed probes                              |       | 0 | <= 0    |
chat_first_p50_s    | 7. 500 streams: first line p50 (wave 1)         | s     | 2 |         | 15
chat_first_p95_s    | 7.   first line p95 (worst wave)                | s     | 2 | <= 1    |
chat_last_done_s    | 7.   last stream done (worst wave)              | s     | 2 | <= 3    | 20
chat_connect_max_s  | 7.   slowest TCP connect (worst wave)           | s     | 2 |         |
chat_connect_late   | 7.   connects slower than 0.5 s (worst wave)    |       | 0 |         |
chat_concurrent     | 7.   streams open at once, client view (min)    |       | 0 |         |
chat_failures       | 7.   failed streams (all waves)                 |       | 0 | <= 0    |
chat_probe_max_ms   | 7.   50 ms health probe: max (worst wave)       | ms    | 1 |         |
chat_peak_mb        | 7.   peak RSS (worst wave)                      | MB    | 1 | <= 90   | 509
chat_rss_w1_mb      | 7.   RSS after wave 1                           | MB    | 1 |         |
chat_rss_w2_mb      | 7.   RSS after wave 2                           | MB    | 1 |         |
chat_rss_w3_mb      | 7.   RSS after wave 3                           | MB    | 1 |         |
chat_warmup_mb      | 7.   RSS growth, wave 1 to wave 2 (warm-up)     | MB    | 1 |         |
chat_growth_mb      | 7.   RSS growth, wave 2 to last wave            | MB    | 1 | <= 1    |
chat_upstream_open  | 7.   upstream conns left open (idle pool: 4)    |       | 0 | <= 4    |
chat_cpu_server_s   | 7.   CPU per wave: server                       | s     | 2 |         |
chat_cpu_provider_s | 7.   CPU per wave: fake provider                | s     | 2 |         |
chat_cpu_client_s   | 7.   CPU per wave: client (loadgen.py)          | s     | 2 |         |
cl_first_p95_s      | 8. 500 streams + 16 logins: first line p95      | s     | 2 | <= 1    |
cl_last_done_s      | 8.   last stream done                           | s     | 2 | <= 3    |
cl_failures         | 8.   failed streams                             |       | 0 | <= 0    |
cl_login_rps        | 8.   logins meanwhile                           | /s    | 1 |         |
cl_login_p50_ms     | 8.   login p50                                  | ms    | 0 |         |
cl_probe_max_ms     | 8.   50 ms health probe: max                    | ms    | 1 |         |
log_tracebacks      |    server log (1.-8.): tracebacks               |       | 0 | <= 0    |
log_error_lines     |    server log (1.-8.): ERROR lines              |       | 0 |         |
"""
NOFILE_ROWS_TEXT = """
nf{n}_max_connections | 9. open-file limit {n}: connection cap (logged) |  | 0 |        |
nf{n}_ok              | 9.   streams completed                          |  | 0 |        |
nf{n}_over_capacity   | 9.   quick 503 over_capacity                    |  | 0 |        |
nf{n}_other_failures  | 9.   other failures                             |  | 0 | <= 0   |
nf{n}_last_done_s     | 9.   last stream done                           | s | 2 |       |
nf{n}_concurrent      | 9.   streams open at once, client view          |  | 0 |        |
nf{n}_answering       | 9.   alive and answering afterwards (1 = yes)   |  | 0 | >= 1   |
nf{n}_emfile_lines    | 9.   "Too many open files" in its log           |  | 0 | <= 0   |
nf{n}_tracebacks      | 9.   tracebacks in its log                      |  | 0 | <= 0   |
"""
TAIL_ROWS_TEXT = """
run_seconds           |    wall time of one run                         | s | 0 |        |
"""


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table."""

    key: str
    label: str
    unit: str
    digits: int
    target: tuple[str, float] | None
    original: float | None


def parse_rows(text: str) -> list[Row]:
    """Rows from the `key | label | unit | decimals | target | original` text above."""
    rows = []
    for line in text.strip().splitlines():
        key, label, unit, digits, target, original = (cell.strip() for cell in line.split("|"))
        operator, _, bound = target.partition(" ")
        rows.append(
            Row(
                key,
                label,
                unit,
                int(digits),
                (operator, float(bound)) if target else None,
                float(original) if original else None,
            )
        )
    return rows


def table_rows(nofiles: list[int]) -> list[Row]:
    """Every row, scenario 9 once per open-file limit."""
    rows = parse_rows(ROWS_TEXT)
    for nofile in nofiles:
        rows += parse_rows(NOFILE_ROWS_TEXT.replace("{n}", str(nofile)))
    return rows + parse_rows(TAIL_ROWS_TEXT)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every figure over the runs."""
    keys = sorted({key for run in runs for key in run})
    summary = {}
    for key in keys:
        values = [run[key] for run in runs if isinstance(run.get(key), int | float)]
        if values:
            summary[key] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "n": len(values),
            }
    return summary


def verdict(value: float, target: tuple[str, float] | None) -> str:
    """'ok' or 'MISS' against a target ('' without one)."""
    if target is None:
        return ""
    operator, bound = target
    met = value <= bound if operator == "<=" else value >= bound
    return "ok" if met else "MISS"


def render_table(summary: dict[str, dict[str, float]], rows: list[Row], runs: int) -> str:
    """The figures as a fixed-width text table."""
    header = ("figure", "median", "min-max" if runs > 1 else "", "target", "original", "")
    lines = [header]
    for row in rows:
        stat = summary.get(row.key)
        if stat is None:
            continue

        def fmt(value: float, digits: int = row.digits) -> str:
            return f"{value:,.{digits}f}"

        lines.append(
            (
                f"{row.label} ({row.unit})" if row.unit else row.label,
                fmt(stat["median"]),
                f"{fmt(stat['min'])}-{fmt(stat['max'])}" if runs > 1 else "",
                f"{row.target[0]} {fmt(row.target[1])}" if row.target else "",
                fmt(row.original) if row.original is not None else "",
                verdict(stat["median"], row.target),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


###############################################################################
# main()
###############################################################################


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk = shutil.which("wrk")
    wrk_version = ""
    if wrk:
        done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
        wrk_version = (done.stdout + done.stderr).splitlines()[0] if done.stdout else ""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "wrk": wrk_version,
    }


def source_identity(server: Path, snapshot: Path) -> dict[str, Any]:
    """Which code was measured: the snapshot's SHA-256, the git commit, local edits."""
    identity: dict[str, Any] = {
        "path": str(server),
        "sha256": hashlib.sha256(snapshot.read_bytes()).hexdigest(),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "cloudchat.py"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        identity["git_head"] = head.stdout.strip()
        if server.resolve() == (ROOT / "cloudchat.py").resolve():
            identity["cloudchat_py_modified"] = bool(dirty.stdout.strip())
    return identity


def service_nofile() -> int | None:
    """LimitNOFILE of deploy/systemd/cloudchat.service, if the file says."""
    with contextlib.suppress(OSError):
        match = re.search(r"^LimitNOFILE=(\d+)", SERVICE_FILE.read_text(), re.MULTILINE)
        if match:
            return int(match.group(1))
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--setup", choices=("embedded", "postgres"), default="embedded")
    parser.add_argument("--runs", type=int, default=3, help="runs to take the median of")
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write every figure (default: bench/results/<setup>-<time>.json)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios (default all): {','.join(SCENARIOS)}",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load scenario")
    parser.add_argument("--streams", type=int, default=500, help="chat streams per wave")
    parser.add_argument("--waves", type=int, default=3, help="waves in the chat scenario")
    parser.add_argument(
        "--nofile",
        default="",
        help="open-file limits for scenario 9 (default: 1024 and the service's LimitNOFILE)",
    )
    parser.add_argument("--no-wrk", dest="wrk", action="store_false", help="never use wrk")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra setting for the server (repeatable), e.g. REDIS_POOL_SIZE=64",
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the server logs to this folder")
    parser.add_argument(
        "--profile",
        type=Path,
        help="record each scenario with py-spy (on PATH) into this folder; perturbs figures",
    )
    parser.add_argument(
        "--server",
        type=Path,
        default=ROOT / "cloudchat.py",
        help="the server module to run (default: cloudchat.py beside bench/; a patched copy"
        " for an A/B comparison needs schema.sql beside it)",
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; use {SCENARIOS}")
    if args.nofile:
        args.nofile = sorted({int(n) for n in args.nofile.split(",")})
    else:
        args.nofile = sorted({1024, service_nofile() or 1024})
    if not 1 <= args.runs <= 20 or not 1 <= args.duration <= 60 or not 1 <= args.streams <= 5000:
        parser.error("keep --runs in 1..20, --duration in 1..60 and --streams in 1..5000")
    if not 1 <= args.waves <= 10:
        parser.error("keep --waves in 1..10")
    extra = {}
    for item in args.env:
        name, equals, value = item.partition("=")
        if not equals or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            parser.error(f"--env {item!r} is not NAME=VALUE")
        extra[name] = value
    args.env = extra
    args.wrk = args.wrk and shutil.which("wrk") is not None
    if args.profile and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy on PATH (pip install py-spy)")
    return args


@contextlib.contextmanager
def open_storage(setup: str, workdir: Path, server_path: Path) -> Iterator[Any]:
    """The storage of the chosen setup, released at the end."""
    kind = PostgresStorage if setup == "postgres" else EmbeddedStorage
    storage = kind(workdir, server_path)
    try:
        yield storage
    finally:
        storage.close()


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios `--runs` times; print the table; write the JSON file."""
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "setup": args.setup,
        "runs": args.runs,
        "scenarios": args.only,
        "duration_s": args.duration,
        "streams": args.streams,
        "waves": args.waves,
        "nofile": args.nofile,
        "extra_env": args.env,
        "load_tool": "wrk" if args.wrk else "loadgen.py",
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
    }
    runs: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="cc-bench-"))
    try:
        # Every run measures the same code, even while someone edits the file: a snapshot
        # of the server module (and the schema.sql beside it) taken now.
        snapshot = workdir / "server"
        snapshot.mkdir()
        shutil.copyfile(args.server, snapshot / args.server.name)
        if (args.server.parent / "schema.sql").exists():
            shutil.copyfile(args.server.parent / "schema.sql", snapshot / "schema.sql")
        meta["server"] = source_identity(args.server, snapshot / args.server.name)
        args.server = snapshot / args.server.name
        py_compile.compile(str(args.server), doraise=True)
        with open_storage(args.setup, workdir, args.server) as storage:
            for number in range(1, args.runs + 1):
                run = Run(number, storage, args)
                began = time.monotonic()
                run.execute()
                run.figures["run_seconds"] = time.monotonic() - began
                run.say(f"done in {run.figures['run_seconds']:.0f} s")
                runs.append(run.figures)
                details.append(run.details)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(runs)
    rows = table_rows(args.nofile)
    box = meta["machine"]
    print(
        f"CloudChat bench, setup {args.setup}, {args.runs} run(s), median"
        f"{' (min-max)' if args.runs > 1 else ''}; load: {meta['load_tool']}; {box['nproc']} x"
        f" {box['cpu_model']}, Python {box['python']}, load average at start"
        f" {box['loadavg_at_start'][0]:.2f}; MB = MiB"
    )
    code = meta["server"]
    print(
        f"server {code['path']} sha256 {code['sha256'][:12]}, git {code.get('git_head', '?')[:12]}"
        f"{' + local edits' if code.get('cloudchat_py_modified') else ''}"
        + (f"; extra settings {args.env}" if args.env else "")
    )
    print(render_table(summary, rows, args.runs))
    out = args.json or BENCH / "results" / f"{args.setup}-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs, "details": details}, indent=1)
    )
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
