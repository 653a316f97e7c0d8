"""CloudChat's benchmark: the real server against a fake provider, issue 6's figures.

    .venv/bin/python bench/run.py --setup embedded|postgres [--runs 3] [--json out.json]
                                  [--only floor,me,healthz,register,login,chat,chat_plain,
                                          chat_login,chat2000,nofile]

bench/README.md says what each scenario measures, what the setups start and touch, and
how to read the table. Loopback only; every load loop is bounded in count and time; every
process started here is stopped by its PID; temporary files and the private PostgreSQL
cluster are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import harness as h  # bench/ is sys.path[0] when this file runs as a script

SCENARIOS = (
    "floor", "me", "healthz", "register", "login", "chat", "chat_plain", "chat_login",
    "chat2000", "nofile",
)  # fmt: skip
FLOOR_IMPORTS = (
    "import gevent, bottle, psycopg2, redis, argon2; from gevent import monkey;"
    " monkey.patch_all(); import sys; print('ready', flush=True); sys.stdin.read()"
)
LOGIN_USERS = 16


def import_floor() -> float:
    """RSS of a Python that imported the runtime packages, patched, and waits on stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOR_IMPORTS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,  # gevent warns: ssl imported before patching
    )  # fmt: skip
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the import-floor process did not start")
        return h.settle(proc.pid)
    finally:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.communicate("", timeout=10)
        h.stop_process(proc, 5)


@contextlib.contextmanager
def profiled(pid: int, folder: Path | None, name: str) -> Iterator[None]:
    """`py-spy record` of the server for the length of the block (--profile, py-spy on PATH;
    perturbs the figures): collapsed stacks in <name>.txt, the functions holding the CPU in
    <name>-top.txt (threads waiting on the thread pool's queue left out)."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    stacks = folder / f"{name}.txt"
    argv = ["py-spy", "record", "--pid", str(pid), "--rate", "1000", "--nonblocking"]
    argv += ["--format", "raw", "-o", str(stacks)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # let it attach before the load starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(30)
        h.stop_process(spy, 5)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in stacks.read_text().splitlines() if stacks.exists() else []:
        stack, _, count = line.rpartition(" ")
        if count.isdigit() and "acquire_with_timeout" not in stack.rsplit(";", 1)[-1]:
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            own[frames[-1]] += int(count)
            inclusive.update(dict.fromkeys(set(frames), int(count)))
    total = max(1, sum(own.values()))
    lines = [f"{total} samples at 1000 Hz (idle time not sampled)", "", "self:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(30)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(60)]
    (folder / f"{name}-top.txt").write_text("\n".join(lines) + "\n")


Requests = Callable[[int], Callable[[int], h.Request]]  # worker number -> its requests


def login_requests(users: list[str]) -> Requests:
    """Worker i logs in as users[i] again and again (no cookie: a new session each time)."""
    return lambda worker: lambda _: (
        "POST", "/auth/login", {"identifier": users[worker], "password": h.PASSWORD}, 200
    )  # fmt: skip


def register_requests(tag: str) -> Requests:
    """Worker i registers bench-<tag>-r<i>-<n>@example.com, n = 0, 1, ..."""
    return lambda worker: lambda n: (
        "POST", "/auth/register",
        {"email": f"bench-{tag}-r{worker}-{n}@example.com", "password": h.PASSWORD}, 201,
    )  # fmt: skip


@contextlib.contextmanager
def workers(port: int, count: int, make: Requests, limit: float) -> Iterator[list[h.Repeater]]:
    """`count` Repeaters, each on its own connection, sending as fast as they can for at
    most `limit` s; stopped (the requests in flight finished) at the end of the block."""
    repeaters = [h.Repeater(port, make(n), limit=limit) for n in range(count)]
    for repeater in repeaters:
        repeater.thread.start()
    try:
        yield repeaters
    finally:
        for repeater in repeaters:
            repeater.stopped.set()
        for repeater in repeaters:
            repeater.thread.join(60)


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
        argv = ["wrk", "-t1", "-c50", f"-d{duration:g}s", "--timeout", "10s", "-s"]
        argv += [str(h.BENCH / "wrk_report.lua")]
        argv += [arg for header in headers for arg in ("-H", header)]
        argv += [f"http://127.0.0.1:{port}{path}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
        if not (match := re.search(r"BENCH_JSON (\{.*\})", done.stdout)):
            raise RuntimeError(f"wrk gave no summary: {done.stdout}{done.stderr}")
        r = json.loads(match.group(1))
        errors = sum(r[k] for k in ("connect", "read", "write", "status", "timeout"))
        p50, p99, top = (r[k] / 1000 for k in ("p50_us", "p99_us", "max_us"))
        rps = r["requests"] / (r["duration_us"] / 1e6)
        return Load(r["requests"], rps, p50, p99, top, errors, "wrk")
    argv = [sys.executable, str(h.BENCH / "loadgen.py"), "get", "--port", str(port), "--path"]
    argv += [path, "--connections", "50", "--duration", str(duration)]
    argv += [arg for header in headers for arg in ("--header", header)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    r = json.loads(done.stdout)
    p50, p99, top = r["p50_ms"], r["p99_ms"], r["max_ms"]
    return Load(r["requests"], r["rps"], p50, p99, top, sum(r["errors"].values()), "loadgen.py")


@dataclasses.dataclass
class Wave:
    """One wave of concurrent chat streams: outcomes and timings (s from the wave's start)."""

    streams: int
    outcomes: dict[str, int]
    ok: int
    failures: int
    first_p50_s: float | None
    first_p95_s: float | None
    last_done_s: float | None
    connect_max_s: float | None
    connect_over_0_5s: int
    peak_concurrent: int  # streams open at once, as the client saw it
    wall_s: float
    peak_rss_mb: float
    rss_before_mb: float
    rss_after_mb: float
    upstream_open: int
    cpu_s: dict[str, float]
    new_connections: int  # upstream connections the provider accepted during the wave
    full_handshakes: int
    resumed_handshakes: int
    probe: h.Tally
    slow_probes: list[tuple[float, float]]


def raise_nofile(streams: int) -> Callable[[], None]:
    """For the load generator's process: room for `streams` sockets."""

    def limit() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = max(soft, streams + 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))

    return limit


def chat_wave(
    server: h.LoggedProcess, upstream: h.StreamProvider, streams: int, kind: str = "tls"
) -> Wave:
    """One wave of concurrent chat streams from loadgen.py, a 50 ms health probe running:
    timings, outcomes, RSS, CPU, the provider's new connections and handshakes."""
    argv = [sys.executable, str(h.BENCH / "loadgen.py"), "chat", "--port", str(server.port)]
    argv += ["--streams", str(streams), "--timeout", "90"]
    pids = {"server": server.pid, "provider": upstream.process.pid}
    cpu = {name: h.cpu_seconds(pid) for name, pid in pids.items()}
    client = children_cpu_seconds()
    before = upstream.stats(kind)
    with h.RssSampler(server.pid) as rss, h.health_probe(server.port) as probe:
        began = time.monotonic()
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, preexec_fn=raise_nofile(streams)
        )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen.py chat failed: {done.stderr[-2000:]}")
    cpu = {name: h.cpu_seconds(pid) - cpu[name] for name, pid in pids.items()}
    cpu["client"] = children_cpu_seconds() - client
    report = json.loads(done.stdout)
    per_stream = report["streams"]
    outcomes = Counter(s["outcome"] for s in per_stream)
    firsts = [s["first_line_s"] for s in per_stream if s["first_line_s"] is not None]
    dones = [s["done_s"] for s in per_stream if s["outcome"] == "ok"]
    connects = [s["connect_s"] for s in per_stream if s["connect_s"] is not None]
    # Accept-queue overflow spreads the connects out, and streams that end early make room
    # for late ones: count the streams open at once from their (connect, done) spans.
    spans = [(s["connect_s"], s["done_s"]) for s in per_stream]
    spans = [(a, b) for a, b in spans if a is not None and b is not None]
    open_now = peak_open = 0
    for _, step in sorted(edge for a, b in spans for edge in ((a, 1), (b, -1))):
        open_now += step
        peak_open = max(peak_open, open_now)
    time.sleep(0.5)  # let closed upstream connections reach the provider
    after = upstream.stats(kind)
    asking = 1 if kind == "plain" else 0  # the stats call's own connection
    return Wave(
        streams, dict(outcomes), outcomes["ok"], streams - outcomes["ok"],
        h.percentile(firsts, 50), h.percentile(firsts, 95), max(dones, default=None),
        max(connects, default=None), sum(1 for c in connects if c > 0.5), peak_open,
        report["wall_s"], rss.peak, rss.before, h.settle(server.pid), after["open"], cpu,
        after["accepted"] - before["accepted"] - asking,
        after["full_handshakes"] - before["full_handshakes"],
        after["resumed_handshakes"] - before["resumed_handshakes"],
        h.tally([probe], 1.0), probe.slow(began),
    )  # fmt: skip


def children_cpu_seconds() -> float:
    """CPU time of every child this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- One run: every scenario against one fresh server ------------------------------------


class Run:
    """One run of the chosen scenarios against a fresh storage, provider and server;
    `figures` holds its flat results (the table's keys), `details` the JSON file's extras."""

    def __init__(self, number: int, code: h.Code, args: argparse.Namespace) -> None:
        self.number, self.code, self.args = number, code, args
        self.tag = f"{os.getpid()}x{number}x{secrets.token_hex(2)}"
        self.workdir = code.copy.parent.parent / f"run{number}"
        self.workdir.mkdir()
        self.figures: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self.processes: list[h.LoggedProcess] = []

    def say(self, text: str) -> None:
        """Progress on stderr (the table goes to stdout)."""
        h.say(f"run {self.number}", text)

    def put(self, prefix: str, result: Any) -> None:
        """A typed result's fields as figures `<prefix>_<field>`."""
        self.figures.update({f"{prefix}_{k}": v for k, v in dataclasses.asdict(result).items()})

    def profiled(
        self, scenario: str, server: h.LoggedProcess | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """The server (by default the run's) recorded by py-spy during a scenario."""
        name = f"{self.args.setup}-run{self.number}-{scenario}"
        return profiled((server or self.server).pid, self.args.profile, name)

    def execute(self) -> None:
        """Every selected scenario, then stop and remove whatever it started."""
        began, only = time.monotonic(), set(self.args.only)
        if "floor" in only:
            self.figures["floor_mb"] = import_floor()
            self.say(f"import floor {self.figures['floor_mb']:.1f} MB")
        storage = h.Storage.of_setup(self.args.setup, self.workdir, self.code)
        try:
            self.upstream = h.StreamProvider.start(self.workdir)
            self.processes.append(self.upstream.process)
            self.base_env = h.server_env(storage.env) | self.args.env
            self.server = self.start_server("server.log")
            self.scenarios(only)
        except Exception as exc:
            tail = self.processes[-1].log_text()[-3000:] if self.processes else ""
            raise RuntimeError(f"run {self.number} failed: {exc!r}\nlast log:\n{tail}") from exc
        finally:
            for process in self.processes:
                process.stop()
            storage.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.figures["run_seconds"] = time.monotonic() - began
        self.say(f"done in {self.figures['run_seconds']:.0f} s")

    def start_server(
        self, log_name: str, nofile: int | None = None, kind: str = "tls"
    ) -> h.LoggedProcess:
        """A server with this run's settings (and an open-file limit), its provider over
        TLS or plain HTTP."""
        env = self.base_env | self.upstream.env(kind) | self.args.env
        server = h.start_server(self.code, env, self.workdir / log_name, nofile)
        self.processes.append(server)
        self.say(f"server PID {server.pid} on port {server.port} ({log_name})")
        return server

    def scenarios(self, only: set[str]) -> None:
        """1.-10., those selected."""
        fig, server = self.figures, self.server
        fig["start_mb"] = h.settle(server.pid)
        h.register_user(server.port, owner := f"bench-{self.tag}-me@example.com")
        cookie = h.login_cookie(server.port, owner)
        if "floor" in only:
            client = h.Client(server.port, headers={"Cookie": cookie})
            for _ in range(1000):
                if (answer := client.exchange("GET", "/auth/me")).status != 200:
                    raise RuntimeError(f"GET /auth/me answered {answer.outcome()}")
            client.drop()
            fig["after_mb"] = h.settle(server.pid)
            fig["start_ratio"] = fig["start_mb"] / fig["floor_mb"]
            fig["after_ratio"] = fig["after_mb"] / fig["floor_mb"]
            start, after = fig["start_mb"], fig["after_mb"]
            self.say(f"server after start {start:.1f} MB, after 1,000 requests {after:.1f} MB")
        users = [f"bench-{self.tag}-u{i}@example.com" for i in range(LOGIN_USERS)]
        for email in users if only & {"login", "chat_login"} else []:
            h.register_user(server.port, email)
        if only & {"me", "healthz"}:
            self.bare_reference()
        if "me" in only:
            self.http_load("me", "/auth/me", [f"Cookie: {cookie}"])
        if "healthz" in only:
            self.http_load("hz", "/auth/healthz", [])
        if "register" in only:
            self.logins_or_registrations("reg", 8, register_requests(self.tag))
        if "login" in only:
            self.logins_or_registrations("login", LOGIN_USERS, login_requests(users))
        if "chat" in only:
            self.chat("chat", server, "tls")
        if "chat_login" in only:
            self.chat_login(users)
        self.log_counts("log", server)
        server.stop()
        if "chat_plain" in only:
            plain = self.start_server("server-plain.log", kind="plain")
            try:
                self.chat("chatp", plain, "plain")
                self.log_counts("chatp", plain)
            finally:
                plain.stop()
            if "chat" in only:
                fig["chat_p95_ratio"] = fig["chat_first_p95_s"] / fig["chatp_first_p95_s"]
        if "chat2000" in only:
            for kind in ("plain", "tls"):
                self.chat2000(kind)
        if "nofile" in only:
            for nofile in self.args.nofile:
                self.nofile(nofile)

    def http_load(self, prefix: str, path: str, headers: list[str]) -> None:
        """2. and 3.: GET load at 50 connections, and the server's CPU per request."""
        pid, args = self.server.pid, self.args
        cpu = h.cpu_seconds(pid)
        with h.RssSampler(pid) as rss, self.profiled(prefix):
            load = http_load(self.server.port, path, headers, args.wrk, args.duration)
        # CPU per request: the figure least disturbed by whatever else the box is doing.
        self.figures[f"{prefix}_cpu_us"] = (h.cpu_seconds(pid) - cpu) / max(1, load.requests) * 1e6
        self.put(prefix, load)
        self.figures[f"{prefix}_ratio"] = load.rps / self.figures["bare_rps"]
        self.figures[f"{prefix}_peak_rss_mb"] = rss.peak
        self.say(f"GET {path}: {load.rps:.0f} req/s, p99 {load.p99_ms:.1f} ms")

    def bare_reference(self) -> None:
        """req/s of bench/bare_wsgi.py under the same load: what this box allows at all."""
        argv = [sys.executable, str(h.BENCH / "bare_wsgi.py")]
        bare = h.LoggedProcess(argv, dict(os.environ), self.workdir / "bare.log")
        try:
            load = http_load(bare.port, "/", [], self.args.wrk, self.args.duration)
        finally:
            bare.stop()
        self.put("bare", load)
        self.say(f"bare gevent WSGI app: {load.rps:.0f} req/s")

    def logins_or_registrations(self, prefix: str, count: int, make: Callable) -> None:
        """4. and 6. (16 login workers, the 50 ms probe) or 5. (8 registering) for --duration s."""
        login, duration, port = prefix == "login", self.args.duration, self.server.port
        probe = h.health_probe(port, limit=120 if login else 0)
        with h.RssSampler(self.server.pid) as rss, probe, self.profiled(prefix):
            began = time.monotonic()
            with workers(port, count, make, duration) as repeaters:
                time.sleep(duration)
            seconds = time.monotonic() - began
        self.put(prefix, h.tally(repeaters, seconds, good_only=True))
        self.figures[f"{prefix}_peak_delta_mb"] = rss.peak - rss.before
        outcomes = Counter(outcome for r in repeaters for _, outcome, _ in r.samples)
        self.details[f"{prefix}_errors"] = {k: n for k, n in outcomes.items() if k != "ok"}
        if not login:
            return self.say(f"registrations: {self.figures['reg_rps']:.1f}/s")
        self.put("probe", h.tally([probe], seconds))
        self.details["login_slow_probes"] = probe.slow(began)
        fig = self.figures
        self.say(f"logins: {fig['login_rps']:.1f}/s, probe max {fig['probe_max_ms'] or 0:.0f} ms")

    def chat(self, prefix: str, server: h.LoggedProcess, kind: str) -> None:
        """7. (provider over TLS) and 7p. (plain HTTP): --waves waves of --streams streams."""
        waves: list[Wave] = []
        for number in range(1, self.args.waves + 1):
            with self.profiled(f"{prefix}-wave{number}", server):
                wave = chat_wave(server, self.upstream, self.args.streams, kind)
            waves.append(wave)
            self.figures[f"{prefix}_rss_w{number}_mb"] = wave.rss_after_mb
            self.say(
                f"{prefix} wave {number}: {wave.ok}/{wave.streams} ok, first line p95"
                f" {wave.first_p95_s or 0:.2f} s, last done {wave.last_done_s or 0:.2f} s,"
                f" peak {wave.peak_rss_mb:.1f} MB, {wave.new_connections} new upstream"
                f" connections ({wave.full_handshakes} full TLS handshakes), probe max"
                f" {wave.probe.max_ms or 0:.0f} ms"
            )
        self.details[f"{prefix}_waves"] = waves

        def worst(key: str) -> Any:
            return max((v for w in waves if (v := getattr(w, key)) is not None), default=None)

        # The first wave warms up (allocator high-water marks, pools); a leak shows as
        # growth after it. With --waves 8 the RSS is flat from wave 3 or 4 on.
        second = waves[min(1, len(waves) - 1)].rss_after_mb
        later = waves[1:] or waves
        figures = dict(
            first_p50_s=waves[0].first_p50_s, first_p95_s=worst("first_p95_s"),
            last_done_s=worst("last_done_s"), connect_max_s=worst("connect_max_s"),
            connect_late=worst("connect_over_0_5s"),
            probe_max_ms=max(w.probe.max_ms or 0 for w in waves),
            concurrent=min(w.peak_concurrent for w in waves),
            failures=sum(w.failures for w in waves), peak_mb=worst("peak_rss_mb"),
            warmup_mb=second - waves[0].rss_after_mb, growth_mb=waves[-1].rss_after_mb - second,
            upstream_open=worst("upstream_open"), new_conns_w1=waves[0].new_connections,
            full_hs_w1=waves[0].full_handshakes,
            new_conns_later=max(w.new_connections for w in later),
            full_hs_later_pct=max(100 * w.full_handshakes / w.streams for w in later),
        )  # fmt: skip
        self.figures.update({f"{prefix}_{key}": value for key, value in figures.items()})
        for who in ("server", "provider", "client"):
            self.figures[f"{prefix}_cpu_{who}_s"] = statistics.mean(w.cpu_s[who] for w in waves)

    def chat2000(self, kind: str) -> None:
        """10.: one wave of --big-streams streams on a fresh server (LimitNOFILE 8192)."""
        prefix = f"big_{kind}"
        server = self.start_server(f"server-{prefix}.log", nofile=8192, kind=kind)
        try:
            h.settle(server.pid)
            with self.profiled(prefix, server):
                wave = chat_wave(server, self.upstream, self.args.big_streams, kind)
            self.log_counts(prefix, server)
        finally:
            server.stop()
        self.details[prefix] = wave
        figures = {
            "ok": wave.ok, "failures": wave.failures, "first_p95_s": wave.first_p95_s,
            "last_done_s": wave.last_done_s, "peak_mb": wave.peak_rss_mb,
            "probe_max_ms": wave.probe.max_ms, "concurrent": wave.peak_concurrent,
            "cpu_server_s": wave.cpu_s["server"], "cpu_provider_s": wave.cpu_s["provider"],
            "cpu_client_s": wave.cpu_s["client"],
        }  # fmt: skip
        self.figures.update({f"{prefix}_{key}": value for key, value in figures.items()})
        self.say(
            f"{wave.streams} streams ({kind}): {wave.ok} ok, last done"
            f" {wave.last_done_s or 0:.2f} s, peak {wave.peak_rss_mb:.1f} MB"
        )

    def chat_login(self, users: list[str]) -> None:
        """8.: a wave while the 16 login workers run."""
        port = self.server.port
        with self.profiled("chat_login"):
            began = time.monotonic()
            with workers(port, LOGIN_USERS, login_requests(users), 120) as repeaters:
                time.sleep(0.5)  # the logins are under way when the wave arrives
                wave = chat_wave(self.server, self.upstream, self.args.streams)
            logins = h.tally(repeaters, time.monotonic() - began, good_only=True)
        self.details["chat_login_wave"] = wave
        self.put("cl_login", logins)
        self.figures.update(
            cl_first_p95_s=wave.first_p95_s, cl_last_done_s=wave.last_done_s,
            cl_failures=wave.failures, cl_probe_max_ms=wave.probe.max_ms,
        )  # fmt: skip
        p95 = wave.first_p95_s or 0
        self.say(f"streams + logins: first line p95 {p95:.2f} s, logins {logins.rps:.1f}/s")

    def nofile(self, nofile: int) -> None:
        """9.: a fresh server under an open-file limit, one wave."""
        server = self.start_server(f"server-nofile{nofile}.log", nofile=nofile)
        try:
            h.settle(server.pid)
            wave = chat_wave(server, self.upstream, self.args.streams)
            answer = h.Client(server.port, timeout=5).exchange("GET", "/auth/healthz", keep=False)
            answering = answer.status == 200 and server.alive()
            log = server.log_text()
            capacity = re.search(r"at most (\d+) client connections", log)
            over = wave.outcomes.get("over_capacity", 0)
            figures = {
                "ok": wave.ok, "over_capacity": over, "other_failures": wave.failures - over,
                "last_done_s": wave.last_done_s, "concurrent": wave.peak_concurrent,
                "answering": int(answering), "emfile_lines": log.count("Too many open files"),
                "probe_max_ms": wave.probe.max_ms,
                "max_connections": int(capacity.group(1)) if capacity else None,
            }  # fmt: skip
            self.figures.update({f"nf{nofile}_{key}": value for key, value in figures.items()})
            self.log_counts(f"nf{nofile}", server)
            self.details[f"nofile_{nofile}"] = wave
            self.say(f"nofile {nofile}: {wave.ok} ok, {wave.outcomes}, answering: {answering}")
        finally:
            server.stop()

    def log_counts(self, prefix: str, server: h.LoggedProcess) -> None:
        """Tracebacks and ERROR lines in a server's log; the log itself with --keep-logs."""
        facts = h.LogFacts.read(server.log_text(), top=10)
        self.figures[f"{prefix}_tracebacks"] = facts.tracebacks
        self.figures[f"{prefix}_error_lines"] = facts.error_lines
        self.details[f"{prefix}_complaints"] = facts.complaints
        name = f"{self.args.setup}-run{self.number}-{prefix}.log"
        h.keep_log(self.args.keep_logs, server.log_path, name)


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
chat_first_p50_s    | 7. 500 streams, provider over TLS: first line p50 (wave 1) | s | 2 |   | 15
chat_first_p95_s    | 7.   first line p95 (worst wave)                | s     | 2 | <= 1    |
chat_p95_ratio      | 7.   first line p95 / plain HTTP's (7p.)        | x     | 2 | <= 1.2  |
chat_last_done_s    | 7.   last stream done (worst wave)              | s     | 2 | <= 2.5  | 20
chat_connect_max_s  | 7.   slowest TCP connect (worst wave)           | s     | 2 |         |
chat_connect_late   | 7.   connects slower than 0.5 s (worst wave)    |       | 0 |         |
chat_concurrent     | 7.   streams open at once, client view (min)    |       | 0 |         |
chat_failures       | 7.   failed streams (all waves)                 |       | 0 | <= 0    |
chat_probe_max_ms   | 7.   50 ms health probe: max (worst wave)       | ms    | 1 | <= 100  |
chat_peak_mb        | 7.   peak RSS (worst wave)                      | MB    | 1 | <= 90   | 509
chat_rss_w1_mb      | 7.   RSS after wave 1                           | MB    | 1 |         |
chat_rss_w2_mb      | 7.   RSS after wave 2                           | MB    | 1 |         |
chat_rss_w3_mb      | 7.   RSS after wave 3                           | MB    | 1 |         |
chat_warmup_mb      | 7.   RSS growth, wave 1 to wave 2 (warm-up)     | MB    | 1 |         |
chat_growth_mb      | 7.   RSS growth, wave 2 to last wave            | MB    | 1 | <= 1    |
chat_new_conns_w1   | 7.   wave 1: new upstream connections           |       | 0 |         |
chat_full_hs_w1     | 7.   wave 1: full TLS handshakes (rest resumed) |       | 0 |         |
chat_new_conns_later | 7.   later waves: new upstream conns (worst)   |       | 0 |         |
chat_full_hs_later_pct | 7.   later waves: full handshakes / streams  | %     | 1 | <= 10   |
chat_upstream_open  | 7.   upstream conns idle after a wave (worst)   |       | 0 |         |
chat_cpu_server_s   | 7.   CPU per wave: server                       | s     | 2 |         |
chat_cpu_provider_s | 7.   CPU per wave: provider (asyncio)           | s     | 2 |         |
chat_cpu_client_s   | 7.   CPU per wave: client (loadgen.py)          | s     | 2 |         |
chatp_first_p50_s   | 7p. the same, provider over plain HTTP: first line p50 (wave 1) | s | 2 | |
chatp_first_p95_s   | 7p.  first line p95 (worst wave)                | s     | 2 | <= 1    |
chatp_last_done_s   | 7p.  last stream done (worst wave)              | s     | 2 | <= 2.5  |
chatp_failures      | 7p.  failed streams (all waves)                 |       | 0 | <= 0    |
chatp_probe_max_ms  | 7p.  50 ms health probe: max (worst wave)       | ms    | 1 | <= 100  |
chatp_peak_mb       | 7p.  peak RSS (worst wave)                      | MB    | 1 | <= 90   |
chatp_new_conns_later | 7p.  later waves: new upstream conns (worst)  |       | 0 |         |
chatp_cpu_server_s  | 7p.  CPU per wave: server                       | s     | 2 |         |
chatp_cpu_provider_s | 7p.  CPU per wave: provider (asyncio)          | s     | 2 |         |
chatp_cpu_client_s  | 7p.  CPU per wave: client (loadgen.py)          | s     | 2 |         |
chatp_tracebacks    | 7p.  tracebacks in its log                      |       | 0 | <= 0    |
cl_first_p95_s      | 8. 500 streams + 16 logins: first line p95      | s     | 2 | <= 1    |
cl_last_done_s      | 8.   last stream done                           | s     | 2 | <= 3    |
cl_failures         | 8.   failed streams                             |       | 0 | <= 0    |
cl_login_rps        | 8.   logins meanwhile                           | /s    | 1 |         |
cl_login_p50_ms     | 8.   login p50                                  | ms    | 0 |         |
cl_probe_max_ms     | 8.   50 ms health probe: max                    | ms    | 1 | <= 100  |
log_tracebacks      |    server log (1.-8.): tracebacks               |       | 0 | <= 0    |
log_error_lines     |    server log (1.-8.): ERROR lines              |       | 0 |         |
"""
BIG_ROWS_TEXT = """
big_{k}_ok            | 10. 2,000 streams, provider {k}: completed    |    | 0 |          |
big_{k}_failures      | 10.   failed streams                          |    | 0 | <= 0     |
big_{k}_first_p95_s   | 10.   first line p95                          | s  | 2 |          |
big_{k}_last_done_s   | 10.   last stream done                        | s  | 2 | <= 6     |
big_{k}_peak_mb       | 10.   peak RSS                                | MB | 1 | <= 128   |
big_{k}_probe_max_ms  | 10.   50 ms health probe: max                 | ms | 1 |          |
big_{k}_concurrent    | 10.   streams open at once, client view       |    | 0 |          |
big_{k}_cpu_server_s  | 10.   CPU: server                             | s  | 2 |          |
big_{k}_cpu_provider_s | 10.   CPU: provider (asyncio)                | s  | 2 |          |
big_{k}_cpu_client_s  | 10.   CPU: client (loadgen.py)                | s  | 2 |          |
big_{k}_tracebacks    | 10.   tracebacks in its log                   |    | 0 | <= 0     |
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
nf{n}_probe_max_ms    | 9.   50 ms health probe: max                    | ms | 1 |      |
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


def table_rows(nofiles: list[int]) -> list[Row]:
    """Every row of the texts above, scenario 9's once per open-file limit."""
    text = ROWS_TEXT + "".join(BIG_ROWS_TEXT.replace("{k}", k) for k in ("plain", "tls"))
    text += "".join(NOFILE_ROWS_TEXT.replace("{n}", str(n)) for n in nofiles)
    rows = []
    for line in (text + TAIL_ROWS_TEXT).strip().splitlines():
        if not line.strip():
            continue
        key, label, unit, digits, target, original = (cell.strip() for cell in line.split("|"))
        operator, _, bound = target.partition(" ")
        bounds = (operator, float(bound)) if target else None
        rows.append(
            Row(key, label, unit, int(digits), bounds, float(original) if original else None)
        )
    return rows


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every numeric figure over the runs."""
    summary = {}
    for key in sorted({key for run in runs for key in run}):
        if values := [run[key] for run in runs if isinstance(run.get(key), int | float)]:
            summary[key] = {
                "median": statistics.median(values), "min": min(values), "max": max(values),
                "n": len(values),
            }  # fmt: skip
    return summary


def render_table(summary: dict[str, dict[str, float]], rows: list[Row], runs: int) -> str:
    """The figures as a fixed-width table; the verdict compares the median with the target."""
    lines = [("figure", "median", "min-max" if runs > 1 else "", "target", "original", "")]
    for row in rows:
        if (stat := summary.get(row.key)) is None:
            continue
        fmt = f"{{:,.{row.digits}f}}".format
        verdict, target = "", ""
        if row.target:
            operator, bound = row.target
            met = stat["median"] <= bound if operator == "<=" else stat["median"] >= bound
            verdict, target = "ok" if met else "MISS", f"{operator} {fmt(bound)}"
        lines.append(
            (
                f"{row.label} ({row.unit})" if row.unit else row.label, fmt(stat["median"]),
                f"{fmt(stat['min'])}-{fmt(stat['max'])}" if runs > 1 else "", target,
                "" if row.original is None else fmt(row.original), verdict,
            )
        )  # fmt: skip
    return "\n".join(h.text_table(lines, "lrrrrr"))


# --- main() ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    h.common_options(parser, "embedded")
    add = parser.add_argument
    add("--runs", type=int, default=3, help="runs to take the median of (1..20)")
    add("--only", default=",".join(SCENARIOS), help=f"comma-separated from {SCENARIOS}")
    add("--duration", type=float, default=5.0, help="seconds per load scenario (1..60)")
    add("--streams", type=int, default=500, help="chat streams per wave (1..5000)")
    add("--waves", type=int, default=3, help="waves in the chat scenario (1..10)")
    add("--big-streams", type=int, default=2000, help="streams of chat2000 (1..5000)")
    add("--nofile", default="", help="open-file limits for 9. (default: 1024,LimitNOFILE)")
    add("--no-wrk", dest="wrk", action="store_false", help="never use wrk")
    add("--profile", type=Path, help="record each scenario with py-spy (on PATH) into this folder")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := set(args.only) - set(SCENARIOS):
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; use {SCENARIOS}")
    service = (h.ROOT / "deploy" / "systemd" / "cloudchat.service").read_text()
    limit = re.search(r"^LimitNOFILE=(\d+)", service, re.MULTILINE)
    nofiles = args.nofile.split(",") if args.nofile else [1024, limit[1] if limit else 1024]
    args.nofile = sorted({int(n) for n in nofiles})
    if not (1 <= args.runs <= 20 and 1 <= args.duration <= 60 and 1 <= args.streams <= 5000):
        parser.error("keep --runs in 1..20, --duration in 1..60 and --streams in 1..5000")
    if not 1 <= args.waves <= 10 or not 1 <= args.big_streams <= 5000:
        parser.error("keep --waves in 1..10 and --big-streams in 1..5000")
    args.env = h.parse_env(parser, args.env)
    args.wrk = args.wrk and shutil.which("wrk") is not None
    if args.profile and shutil.which("py-spy") is None:
        parser.error("--profile needs py-spy on PATH (pip install py-spy)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios `--runs` times; print the table; write the JSON file."""
    args = parse_args(argv)
    started, box = dt.datetime.now(dt.UTC), h.Machine.now()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="cc-bench-", ignore_cleanup_errors=True) as tmp:
        code = h.snapshot(args.server, Path(tmp))
        for number in range(1, args.runs + 1):
            runs.append(Run(number, code, args))
            runs[-1].execute()
    tool, spread = "wrk" if args.wrk else "loadgen.py", " (min-max)" if args.runs > 1 else ""
    print(
        f"CloudChat bench, setup {args.setup}, {args.runs} run(s), median{spread}; load: {tool};"
        f" {box.line()}"
    )
    print(code.line() + (f"; extra settings {args.env}" if args.env else ""))
    summary = summarize([run.figures for run in runs])
    print(render_table(summary, table_rows(args.nofile), args.runs))
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "setup": args.setup,
        "runs": args.runs, "scenarios": args.only, "duration_s": args.duration,
        "streams": args.streams, "waves": args.waves, "nofile": args.nofile,
        "extra_env": args.env, "load_tool": tool, "server": code, "machine": box,
        "started": started.isoformat(timespec="seconds"),
    }  # fmt: skip
    record = {"meta": meta, "summary": summary, "runs": [r.figures for r in runs]}
    record["details"] = [run.details for run in runs]
    out = args.json or h.BENCH / "results" / f"{args.setup}-{started:%Y%m%d-%H%M%S}.json"
    h.write_json(out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
