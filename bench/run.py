"""CloudChat's benchmark harness: the real server against a fake provider, issue 6's figures.

    .venv/bin/python bench/run.py --setup embedded|postgres [--runs 3] [--json out.json]
                                  [--only floor,me,healthz,register,login,chat,chat_login,nofile]

bench/README.md says what each scenario measures, what the setups start and touch, and
how to read the table. Loopback only; every load loop is bounded in count and time; every
process started here is stopped by its PID; temporary files, the database and the Redis
keys are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness as h  # bench/ is sys.path[0] when this file runs as a script

SCENARIOS = ("floor", "me", "healthz", "register", "login", "chat", "chat_login", "nofile")
FLOOR_IMPORTS = (
    "import gevent, bottle, psycopg2, redis, argon2; from gevent import monkey;"
    " monkey.patch_all(); import sys; print('ready', flush=True); sys.stdin.read()"
)
LOGIN_USERS = 16
HARD_CAP = 100_000  # requests any one load loop may send, whatever its duration


class Profiler:
    """`py-spy record` of a process for the length of a block (--profile): collapsed stacks
    (`<name>.txt`) and the functions that hold the CPU (`<name>-top.txt`). Perturbs figures."""

    def __init__(self, pid: int, folder: Path | None, name: str) -> None:
        self.pid, self.folder, self.name = pid, folder, name
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Profiler:
        if self.folder is None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = ["py-spy", "record", "--pid", str(self.pid), "--rate", "1000", "--nonblocking"]
        argv += ["--format", "raw", "-o", str(self.folder / f"{self.name}.txt")]
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # let it attach before the load starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None or self.folder is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(30)
        h.stop_process(self._proc, 5)
        stacks = self.folder / f"{self.name}.txt"
        if stacks.exists():
            (self.folder / f"{self.name}-top.txt").write_text(summarize_stacks(stacks))


def summarize_stacks(path: Path, top: int = 30) -> str:
    """Self and inclusive share of each function in py-spy's collapsed stacks (threads
    blocked on the thread pool's queue look busy to py-spy: they are left out)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit() and "acquire_with_timeout" not in stack.rsplit(";", 1)[-1]:
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            own[frames[-1]] += int(count)
            for frame in set(frames):
                inclusive[frame] += int(count)
    total = max(1, sum(own.values()))
    lines = [f"{sum(own.values())} samples at 100 Hz (idle time not sampled)", "", "self:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top * 2)]
    return "\n".join(lines) + "\n"


def import_floor() -> float:
    """RSS of a Python that imported the runtime packages, patched, and waits on stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOR_IMPORTS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,  # gevent warns: ssl imported before patching
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the import-floor process did not start")
        return h.settle(proc.pid)
    finally:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.communicate("", timeout=10)
        h.stop_process(proc, 5)


# --- Clients in this process: login and registration load, the health probe --------------


class Workers:
    """N threads, each on its own kept-alive connection, repeating one kind of request
    until `stop()` or the deadline; they record (latency, ok) per request."""

    def __init__(self, port: int, count: int, make: Callable[[int, int], tuple], deadline: float):
        self.port, self.make, self.deadline = port, make, deadline
        self.results: list[tuple[float, bool]] = []  # (latency, ok)
        self.errors: Counter[str] = Counter()
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(n,), daemon=True) for n in range(count)
        ]
        self.started = self.stopped = time.monotonic()

    def start(self) -> Workers:
        """Start every worker."""
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def _work(self, worker: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        for sequence in range(HARD_CAP // len(self._threads)):
            if self._stop.is_set() or time.monotonic() >= self.deadline:
                break
            method, path, body, expected = self.make(worker, sequence)
            begun, error = time.monotonic(), ""
            try:
                status, _, _ = h.call(conn, method, path, body)
                error = "" if status == expected else f"http_{status}"
            except (OSError, http.client.HTTPException) as exc:
                error = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            with self._lock:
                self.results.append((time.monotonic() - begun, not error))
                self.errors[error] += bool(error)
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
        good = [latency for latency, ok in self.results if ok]
        return {
            f"{prefix}_rps": len(good) / max(1e-9, self.stopped - self.started),
            f"{prefix}_p50_ms": _ms(h.percentile(good, 50)),
            f"{prefix}_p99_ms": _ms(h.percentile(good, 99)),
            f"{prefix}_failures": len(self.results) - len(good),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def login_requests(users: list[str]) -> Callable[[int, int], tuple]:
    """Worker i logs in as users[i] again and again (no cookie: a new session each time)."""
    return lambda worker, _: (
        "POST", "/auth/login", {"identifier": users[worker % len(users)], "password": h.PASSWORD},
        200,
    )  # fmt: skip


def register_requests(tag: str) -> Callable[[int, int], tuple]:
    """Worker i registers bench-<tag>-r<i>-<n>@example.com, n = 0, 1, ..."""
    return lambda worker, n: (
        "POST", "/auth/register",
        {"email": f"bench-{tag}-r{worker}-{n}@example.com", "password": h.PASSWORD}, 201,
    )  # fmt: skip


class HealthProbe:
    """GET /auth/healthz every 50 ms on its own connection, on a fixed schedule (a probe
    that stalls is followed by the next one at once); latencies in ms."""

    def __init__(self, port: int, every: float = 0.05, limit: float = 120.0) -> None:
        self.port, self.every, self.limit, self.failures = port, every, limit, 0
        self.timeline: list[tuple[float, float]] = []  # (monotonic start, latency ms)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, daemon=True)

    def _probe(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        started = time.monotonic()
        for tick in range(1, int(self.limit / self.every) + 1):
            begun = time.monotonic()
            try:
                self.failures += h.call(conn, "GET", "/auth/healthz")[0] != 200
            except (OSError, http.client.HTTPException):
                self.failures += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.timeline.append((begun, (time.monotonic() - begun) * 1000))
            if self._stop.wait(max(0.0, started + tick * self.every - time.monotonic())):
                break
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
        latencies = [ms for _, ms in self.timeline]
        return {
            f"{prefix}_max_ms": max(latencies, default=None),
            f"{prefix}_p99_ms": h.percentile(latencies, 99),
            f"{prefix}_count": len(latencies),
            f"{prefix}_failures": self.failures,
        }


# --- Load generators in their own processes: wrk (or loadgen.py get) and loadgen.py chat


@dataclasses.dataclass
class Load:
    """GET load at 50 connections, as wrk or loadgen.py get reported it."""

    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    tool: str


def http_load(port: int, path: str, headers: list[str], use_wrk: bool, duration: float) -> Load:
    """GET `path` at 50 connections for `duration` s."""
    if use_wrk:
        argv = ["wrk", "-t1", "-c50", f"-d{duration:g}s", "--timeout", "10s"]
        argv += ["-s", str(h.BENCH / "wrk_report.lua")]
        argv += [arg for header in headers for arg in ("-H", header)]
        done = subprocess.run(
            [*argv, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
            timeout=duration + 60,
        )  # fmt: skip
        match = re.search(r"BENCH_JSON (\{.*\})", done.stdout)
        if not match:
            raise RuntimeError(f"wrk gave no summary: {done.stdout}{done.stderr}")
        r = json.loads(match.group(1))
        errors = sum(r[k] for k in ("connect", "read", "write", "status", "timeout"))
        rps = r["requests"] / (r["duration_us"] / 1e6)
        ms = [r[k] / 1000 for k in ("p50_us", "p99_us", "max_us")]
        return Load(r["requests"], rps, ms[0], ms[1], ms[2], errors, "wrk")
    argv = [sys.executable, str(h.BENCH / "loadgen.py"), "get", "--port", str(port), "--path"]
    argv += [path, "--connections", "50", "--duration", str(duration)]
    argv += [arg for header in headers for arg in ("--header", header)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    r = json.loads(done.stdout)
    errors = sum(r["errors"].values())
    return Load(
        r["requests"], r["rps"], r["p50_ms"], r["p99_ms"], r["max_ms"], errors, "loadgen.py"
    )


@dataclasses.dataclass
class Wave:
    """One wave of concurrent chat streams: outcomes and timings (s from the wave's start)."""

    streams: int
    outcomes: dict[str, int]
    ok: int
    failures: int
    first_p50_s: float | None
    first_p95_s: float | None
    first_max_s: float | None
    last_done_s: float | None
    connect_max_s: float | None
    connect_over_0_5s: int
    peak_concurrent: int
    wall_s: float
    peak_rss_mb: float
    rss_before_mb: float
    rss_after_mb: float
    upstream_open: int
    cpu_s: dict[str, float]
    probe: dict[str, Any] = dataclasses.field(default_factory=dict)
    slow_probes: list = dataclasses.field(default_factory=list)


def children_cpu_seconds() -> float:
    """CPU time of every child this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def chat_wave(
    server: h.LoggedProcess, provider: h.LoggedProcess, streams: int, timeout: float = 90.0
) -> Wave:
    """One wave of concurrent chat streams from loadgen.py; timings, outcomes, RSS, CPU."""
    argv = [sys.executable, str(h.BENCH / "loadgen.py"), "chat", "--port", str(server.port)]
    argv += ["--streams", str(streams), "--timeout", str(timeout)]
    before = {"server": server.pid, "provider": provider.pid}
    cpu = {name: h.cpu_seconds(pid) for name, pid in before.items()}
    client = children_cpu_seconds()
    with h.RssSampler(server.pid) as rss:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen.py chat failed: {done.stderr[-2000:]}")
    cpu = {name: h.cpu_seconds(pid) - cpu[name] for name, pid in before.items()}
    cpu["client"] = children_cpu_seconds() - client
    report = json.loads(done.stdout)
    per_stream = report["streams"]
    outcomes = Counter(s["outcome"] for s in per_stream)
    firsts = [s["first_line_s"] for s in per_stream if s["first_line_s"] is not None]
    dones = [s["done_s"] for s in per_stream if s["outcome"] == "ok"]
    connects = [s["connect_s"] for s in per_stream if s["connect_s"] is not None]
    # How many streams were open at once, as the client saw it: accept-queue overflow
    # spreads the connects out, and streams that end early make room for late ones.
    spans = [(s["connect_s"], s["done_s"]) for s in per_stream]
    edges = sorted(
        e for a, b in spans if a is not None and b is not None for e in ((a, 1), (b, -1))
    )
    open_now = peak_open = 0
    for _, step in edges:
        open_now += step
        peak_open = max(peak_open, open_now)
    time.sleep(0.5)  # let closed upstream connections reach the provider
    return Wave(
        streams, dict(outcomes), outcomes["ok"], streams - outcomes["ok"],
        h.percentile(firsts, 50), h.percentile(firsts, 95), max(firsts, default=None),
        max(dones, default=None), max(connects, default=None),
        sum(1 for c in connects if c > 0.5), peak_open, report["wall_s"], rss.peak,
        rss.before, h.settle(server.pid), h.provider_call(provider.port, "GET", "/stats")["open"],
        cpu,
    )  # fmt: skip


# --- One run: every scenario against one fresh server ------------------------------------


class Run:
    """One run of the chosen scenarios; `figures` holds its flat results."""

    def __init__(self, number: int, storage: Any, args: argparse.Namespace) -> None:
        self.number, self.storage, self.args = number, storage, args
        self.only = set(args.only)
        self.tag = f"{os.getpid()}x{number}x{secrets.token_hex(2)}"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"cc-bench-run{number}-"))
        self.figures: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self.provider: h.LoggedProcess | None = None
        self.server: h.LoggedProcess | None = None
        self.env: dict[str, str] = {}

    def say(self, text: str) -> None:
        """Progress on stderr (the table goes to stdout)."""
        h.say(f"run {self.number}", text)

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
        only, fig = self.only, self.figures
        if "floor" in only:
            fig["floor_mb"] = import_floor()
            self.say(f"import floor {fig['floor_mb']:.1f} MB")
        self.provider = h.start_provider(self.workdir)
        self.env = {**h.server_env(self.storage.prepare(self.number), self.provider.port)}
        self.env.update(self.args.env)
        server = self.server = self._start_server("server.log")
        fig["start_mb"] = h.settle(server.pid)
        owner = f"bench-{self.tag}-me@example.com"
        h.register_user(server.port, owner)
        cookie = h.login_cookie(server.port, owner)
        if "floor" in only:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            for _ in range(1000):
                status, body, _ = h.call(conn, "GET", "/auth/me", headers={"Cookie": cookie})
                if status != 200:
                    raise RuntimeError(f"GET /auth/me answered {status}: {body[:200]!r}")
            conn.close()
            fig["after_mb"] = h.settle(server.pid)
            fig["start_ratio"] = fig["start_mb"] / fig["floor_mb"]
            fig["after_ratio"] = fig["after_mb"] / fig["floor_mb"]
            self.say(
                f"server after start {fig['start_mb']:.1f} MB, after 1,000 requests"
                f" {fig['after_mb']:.1f} MB"
            )
        users = [f"bench-{self.tag}-u{i}@example.com" for i in range(LOGIN_USERS)]
        for email in users if only & {"login", "chat_login"} else []:
            h.register_user(server.port, email)
        if only & {"me", "healthz"}:
            self._bare_reference()
        if "me" in only:
            self._http_load("me", "/auth/me", [f"Cookie: {cookie}"])
        if "healthz" in only:
            self._http_load("hz", "/auth/healthz", [])
        if "register" in only:
            self._workers("register", "reg", 8, register_requests(self.tag), probe=False)
        if "login" in only:
            self._workers("login", "login", LOGIN_USERS, login_requests(users), probe=True)
        if "chat" in only:
            self._chat()
        if "chat_login" in only:
            self._chat_login(users)
        self._log_counts("log", server)
        if "nofile" in only:
            server.stop()
            self.server = None
            for nofile in self.args.nofile:
                self._nofile(nofile)

    def _profile(self, scenario: str) -> Profiler:
        assert self.server is not None
        name = f"{self.storage.name}-run{self.number}-{scenario}"
        return Profiler(self.server.pid, self.args.profile, name)

    def _start_server(self, log_name: str, nofile: int | None = None) -> h.LoggedProcess:
        # As deploy/systemd/cloudchat.service starts it: the module from its compiled
        # bytecode (compiling the source at every start costs about 5 MiB of RSS).
        server = self.args.server
        argv, log_path = [sys.executable, "-m", server.stem], self.workdir / log_name
        return h.LoggedProcess(argv, self.env, log_path, nofile=nofile, cwd=server.parent)

    def _http_load(self, prefix: str, path: str, headers: list[str]) -> None:
        assert self.server is not None
        cpu = h.cpu_seconds(self.server.pid)
        with h.RssSampler(self.server.pid) as rss, self._profile(prefix):
            load = http_load(self.server.port, path, headers, self.args.wrk, self.args.duration)
        cpu = h.cpu_seconds(self.server.pid) - cpu
        self.details[prefix] = {**dataclasses.asdict(load), "peak_rss_mb": rss.peak}
        self.details[prefix]["server_cpu_s"] = cpu
        for key in ("rps", "p50_ms", "p99_ms", "errors"):
            self.figures[f"{prefix}_{key}"] = getattr(load, key)
        # CPU per request: the figure least disturbed by whatever else the box is doing.
        self.figures[f"{prefix}_cpu_us"] = cpu / max(1, load.requests) * 1e6
        self.figures[f"{prefix}_ratio"] = load.rps / self.figures["bare_rps"]
        self.say(f"GET {path}: {load.rps:.0f} req/s, p99 {load.p99_ms:.1f} ms")

    def _bare_reference(self) -> None:
        """req/s of bench/bare_wsgi.py under the same load: what this box allows at all."""
        argv = [sys.executable, str(h.BENCH / "bare_wsgi.py")]
        bare = h.LoggedProcess(argv, dict(os.environ), self.workdir / "b.log")
        try:
            load = http_load(bare.port, "/", [], self.args.wrk, self.args.duration)
        finally:
            bare.stop()
        self.details["bare"] = dataclasses.asdict(load)
        self.figures["bare_rps"] = load.rps
        self.say(f"bare gevent WSGI app: {load.rps:.0f} req/s")

    def _workers(self, name: str, prefix: str, count: int, make: Callable, probe: bool) -> None:
        """Registrations (8 workers) or logins (16, with the 50 ms probe) for --duration s."""
        assert self.server is not None
        deadline = time.monotonic() + self.args.duration
        workers = Workers(self.server.port, count, make, deadline)
        with (
            h.RssSampler(self.server.pid) as rss,
            HealthProbe(self.server.port, limit=120 if probe else 0) as probes,
            self._profile(name),
        ):
            workers.start()
            time.sleep(self.args.duration)
            workers.stop()
        self.figures.update(workers.summary(prefix))
        self.figures[f"{prefix}_peak_delta_mb"] = rss.peak - rss.before
        self.details[f"{name}_errors"] = dict(+workers.errors)
        if not probe:
            self.say(f"registrations: {self.figures['reg_rps']:.1f}/s")
            return
        self.figures.update(probes.summary("probe"))
        self.details["login_slow_probes"] = probes.slow(workers.started)
        self.say(
            f"logins: {self.figures['login_rps']:.1f}/s, probe max"
            f" {self.figures['probe_max_ms'] or 0:.0f} ms"
        )

    def _chat(self) -> None:
        assert self.server is not None and self.provider is not None
        waves: list[Wave] = []
        for number in range(1, self.args.waves + 1):
            with self._profile(f"chat-wave{number}"), HealthProbe(self.server.port) as probe:
                wave_start = time.monotonic()
                wave = chat_wave(self.server, self.provider, self.args.streams)
            wave.probe, wave.slow_probes = probe.summary("probe"), probe.slow(wave_start)
            waves.append(wave)
            self.figures[f"chat_rss_w{number}_mb"] = wave.rss_after_mb
            self.say(
                f"chat wave {number}: {wave.ok}/{wave.streams} ok, first line p95"
                f" {wave.first_p95_s or 0:.2f} s, last done {wave.last_done_s or 0:.2f}"
                f" s, peak {wave.peak_rss_mb:.1f} MB"
            )
        self.details["chat_waves"] = [dataclasses.asdict(wave) for wave in waves]

        def worst(key: str) -> Any:
            return max((v for w in waves if (v := getattr(w, key)) is not None), default=None)

        # The first wave warms up (allocator high-water marks, pools); a leak shows as
        # growth after it. With --waves 8 the RSS is flat from wave 3 or 4 on.
        second = waves[min(1, len(waves) - 1)].rss_after_mb
        self.figures.update(
            chat_first_p50_s=waves[0].first_p50_s, chat_first_p95_s=worst("first_p95_s"),
            chat_last_done_s=worst("last_done_s"), chat_connect_max_s=worst("connect_max_s"),
            chat_connect_late=worst("connect_over_0_5s"),
            chat_probe_max_ms=max(w.probe["probe_max_ms"] or 0 for w in waves),
            chat_concurrent=min(w.peak_concurrent for w in waves),
            chat_failures=sum(w.failures for w in waves), chat_peak_mb=worst("peak_rss_mb"),
            chat_warmup_mb=second - waves[0].rss_after_mb,
            chat_growth_mb=waves[-1].rss_after_mb - second,
            chat_upstream_open=worst("upstream_open"),
            **{
                f"chat_cpu_{who}_s": statistics.mean(w.cpu_s[who] for w in waves)
                for who in ("server", "provider", "client")
            },
        )  # fmt: skip

    def _chat_login(self, users: list[str]) -> None:
        assert self.server is not None and self.provider is not None
        deadline = time.monotonic() + 120
        workers = Workers(self.server.port, LOGIN_USERS, login_requests(users), deadline)
        with HealthProbe(self.server.port) as probe, self._profile("chat_login"):
            workers.start()
            time.sleep(0.5)  # the logins are under way when the wave arrives
            wave_start = time.monotonic()
            wave = chat_wave(self.server, self.provider, self.args.streams)
            workers.stop()
        self.details["chat_login_wave"] = dataclasses.asdict(wave)
        self.details["chat_login_slow_probes"] = probe.slow(wave_start)
        self.details["chat_login_errors"] = dict(+workers.errors)
        logins = workers.summary("cl_login")
        self.figures.update(
            cl_first_p95_s=wave.first_p95_s, cl_last_done_s=wave.last_done_s,
            cl_failures=wave.failures, cl_login_rps=logins["cl_login_rps"],
            cl_login_p50_ms=logins["cl_login_p50_ms"],
            cl_probe_max_ms=probe.summary("p")["p_max_ms"],
        )  # fmt: skip
        self.say(
            f"streams + logins: first line p95 {wave.first_p95_s or 0:.2f} s, logins"
            f" {logins['cl_login_rps']:.1f}/s"
        )

    def _nofile(self, nofile: int) -> None:
        assert self.provider is not None
        server = self._start_server(f"server-nofile{nofile}.log", nofile=nofile)
        try:
            h.settle(server.pid)
            wave = chat_wave(server, self.provider, self.args.streams)
            answering = False
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
                answering = h.call(conn, "GET", "/auth/healthz")[0] == 200
                conn.close()
            log = server.log_text()
            capacity = re.search(r"at most (\d+) client connections", log)
            over = wave.outcomes.get("over_capacity", 0)
            figures = {
                "ok": wave.ok, "over_capacity": over, "other_failures": wave.failures - over,
                "last_done_s": wave.last_done_s, "concurrent": wave.peak_concurrent,
                "answering": int(answering and server.alive()),
                "emfile_lines": log.count("Too many open files"),
                "max_connections": int(capacity.group(1)) if capacity else None,
            }  # fmt: skip
            self.figures.update({f"nf{nofile}_{key}": value for key, value in figures.items()})
            self._log_counts(f"nf{nofile}", server)
            self.details[f"nofile_{nofile}"] = dataclasses.asdict(wave)
            self.say(
                f"nofile {nofile}: {wave.ok} ok, {wave.outcomes}, answering afterwards: {answering}"
            )
        finally:
            server.stop()

    def _log_counts(self, prefix: str, server: h.LoggedProcess) -> None:
        log = server.log_text()
        self.figures[f"{prefix}_tracebacks"] = log.count("Traceback (most recent call last)")
        self.figures[f"{prefix}_error_lines"] = len(re.findall(r" (?:ERROR|CRITICAL) ", log))
        self.details[f"{prefix}_complaints"] = dict(h.complaint_kinds(log).most_common(10))
        if self.args.keep_logs:
            self.args.keep_logs.mkdir(parents=True, exist_ok=True)
            target = self.args.keep_logs / f"{self.storage.name}-run{self.number}-{prefix}.log"
            shutil.copyfile(server.log_path, target)


# --- The table: what each figure means, its target and the original deployment's value

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
        bounds = (operator, float(bound)) if target else None
        rows.append(
            Row(key, label, unit, int(digits), bounds, float(original) if original else None)
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
    summary = {}
    for key in sorted({key for run in runs for key in run}):
        values = [run[key] for run in runs if isinstance(run.get(key), int | float)]
        if values:
            summary[key] = {
                "median": statistics.median(values), "min": min(values), "max": max(values),
                "n": len(values),
            }  # fmt: skip
    return summary


def render_table(summary: dict[str, dict[str, float]], rows: list[Row], runs: int) -> str:
    """The figures as a fixed-width text table; the verdict compares the median with the
    target."""
    lines = [("figure", "median", "min-max" if runs > 1 else "", "target", "original", "")]
    for row in rows:
        if (stat := summary.get(row.key)) is None:
            continue

        def fmt(value: float, digits: int = row.digits) -> str:
            return f"{value:,.{digits}f}"

        verdict = ""
        if row.target:
            operator, bound = row.target
            met = stat["median"] <= bound if operator == "<=" else stat["median"] >= bound
            verdict = "ok" if met else "MISS"
        lines.append(
            (
                f"{row.label} ({row.unit})" if row.unit else row.label,
                fmt(stat["median"]),
                f"{fmt(stat['min'])}-{fmt(stat['max'])}" if runs > 1 else "",
                f"{row.target[0]} {fmt(row.target[1])}" if row.target else "",
                "" if row.original is None else fmt(row.original),
                verdict,
            )
        )
    return "\n".join(h.text_table(lines, "lrrrrr"))


# --- main() ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add = parser.add_argument
    add("--setup", choices=("embedded", "postgres"), default="embedded")
    add("--runs", type=int, default=3, help="runs to take the median of")
    add(
        "--json", type=Path,
        help="where to write every figure (default: bench/results/<setup>-<time>.json)",
    )  # fmt: skip
    add(
        "--only", default=",".join(SCENARIOS),
        help=f"comma-separated scenarios (default all): {','.join(SCENARIOS)}",
    )  # fmt: skip
    add("--duration", type=float, default=5.0, help="seconds per load scenario")
    add("--streams", type=int, default=500, help="chat streams per wave")
    add("--waves", type=int, default=3, help="waves in the chat scenario")
    add(
        "--nofile", default="",
        help="open-file limits for scenario 9 (default: 1024 and the service's LimitNOFILE)",
    )  # fmt: skip
    add("--no-wrk", dest="wrk", action="store_false", help="never use wrk")
    add(
        "--env", action="append", default=[], metavar="NAME=VALUE",
        help="an extra setting for the server (repeatable), e.g. REDIS_POOL_SIZE=64",
    )  # fmt: skip
    add("--keep-logs", type=Path, help="copy the server logs to this folder")
    add(
        "--profile", type=Path,
        help="record each scenario with py-spy (on PATH) into this folder; perturbs figures",
    )  # fmt: skip
    add(
        "--server", type=Path, default=h.ROOT / "cloudchat.py",
        help="the server module to run (default: cloudchat.py beside bench/; a patched copy"
        " for an A/B comparison needs schema.sql beside it)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := set(args.only) - set(SCENARIOS):
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; use {SCENARIOS}")
    service = (h.ROOT / "deploy" / "systemd" / "cloudchat.service").read_text()
    limit = re.search(r"^LimitNOFILE=(\d+)", service, re.MULTILINE)
    nofiles = args.nofile.split(",") if args.nofile else [1024, limit[1] if limit else 1024]
    args.nofile = sorted({int(n) for n in nofiles})
    if not 1 <= args.runs <= 20 or not 1 <= args.duration <= 60 or not 1 <= args.streams <= 5000:
        parser.error("keep --runs in 1..20, --duration in 1..60 and --streams in 1..5000")
    if not 1 <= args.waves <= 10:
        parser.error("keep --waves in 1..10")
    args.env = h.parse_env(parser, args.env)
    args.wrk = args.wrk and shutil.which("wrk") is not None
    if args.profile and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy on PATH (pip install py-spy)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios `--runs` times; print the table; write the JSON file."""
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "setup": args.setup,
        "runs": args.runs, "scenarios": args.only, "duration_s": args.duration,
        "streams": args.streams, "waves": args.waves, "nofile": args.nofile,
        "extra_env": args.env, "load_tool": "wrk" if args.wrk else "loadgen.py",
        "started": started.isoformat(timespec="seconds"), "machine": h.machine(),
    }  # fmt: skip
    runs: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="cc-bench-"))
    try:
        args.server, meta["server"] = h.snapshot(args.server, workdir)
        py_compile.compile(str(args.server), doraise=True)
        kind = h.SharedStorage if args.setup == "postgres" else h.EmbeddedStorage
        storage = kind(workdir, args.server)
        try:
            for number in range(1, args.runs + 1):
                run = Run(number, storage, args)
                began = time.monotonic()
                run.execute()
                run.figures["run_seconds"] = time.monotonic() - began
                run.say(f"done in {run.figures['run_seconds']:.0f} s")
                runs.append(run.figures)
                details.append(run.details)
        finally:
            storage.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    box = meta["machine"]
    print(
        f"CloudChat bench, setup {args.setup}, {args.runs} run(s), median"
        f"{' (min-max)' if args.runs > 1 else ''}; load: {meta['load_tool']}; {box['nproc']} x"
        f" {box['cpu_model']}, Python {box['python']}, load average at start"
        f" {box['loadavg_at_start'][0]:.2f}; MB = MiB"
    )
    extra = f"; extra settings {args.env}" if args.env else ""
    print(h.identity_line(meta["server"]) + extra)
    summary = summarize(runs)
    print(render_table(summary, table_rows(args.nofile), args.runs))
    out = args.json or h.BENCH / "results" / f"{args.setup}-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "summary": summary, "runs": runs, "details": details}
    out.write_text(json.dumps(record, indent=1))
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
