"""CloudChat soak test: mixed traffic for N minutes with a fault injected every minute.

    .venv/bin/python bench/soak.py [--minutes 10] [--setup postgres|embedded] [--json out.json]
                                   [--workers 12] [--faults NAME,...] [--fault-seconds 12]
                                   [--seed 1] [--env NAME=VALUE] [--keep-logs DIR]

Not part of CI: ten minutes by default (`--minutes 1` for a quick check). bench/README.md
("Soak") says what it starts, the traffic and its weights, the faults, the quiet point at the
end of every minute, the growth verdict and the flags. Loopback only; every loop is bounded;
every process started here is stopped by its PID, even after Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness as h  # bench/ is sys.path[0] when this file runs as a script

MINUTE, FAULT_AT, QUIET_AT = 60.0, 15.0, 57.0  # the fault and the quiet point: s into a minute
CLIENT_TIMEOUT = 5.0  # no byte for this long: the request counts as a timeout
GRACE = 10.0  # errors up to this long after the healing still belong to the fault
SLOW_CLIENTS = 200
RSS_SLOPE_LIMIT = 0.25  # MB per minute over the second half of the run: a steady climb
UPSTREAM_IDLE = 4  # the server keeps this many idle provider connections for reuse
MAX_ACTIONS_PER_SECOND = 200  # per worker: the hard cap on any worker's loop
GROWTH = (("rss_mb", 3.0, "RSS (MB)"), ("greenlets", 5, "greenlets"), ("open_fds", 8, "open fds"))
WEIGHTS = dict(me=34, healthz=8, login=8, chat=24, chat_abort=4, reset_chat=6, password=4)
WEIGHTS["me_revoked"] = 4
ENDPOINTS = "healthz me me_revoked login chat chat_abort reset_chat forgot reset".split()
STATS_RE = re.compile(r"stats connections=(\d+) greenlets=(\d+) open_fds=(\d+) rss_kib=(\d+)\n")


def say(text: str) -> None:
    """Progress on stderr (the minute reports and the table go to stdout)."""
    h.say("soak", text)


def sleep_until(moment: float) -> None:
    """Sleep until time.monotonic() reaches `moment`."""
    time.sleep(max(0.0, moment - time.monotonic()))


# --- What it measures ------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
    """The `stats` line the server logs on SIGUSR1."""

    connections: int
    greenlets: int
    open_fds: int
    rss_kib: int


@dataclasses.dataclass
class Quiet:
    """The server at a quiet point: every client parked, its connections closed."""

    all_parked: bool
    rss_mb: float
    stats: Stats | None
    upstream_open: int | None  # the provider's open connections

    def figure(self, key: str) -> float | None:
        """rss_mb, greenlets or open_fds."""
        return self.rss_mb if key == "rss_mb" else getattr(self.stats, key, None)

    def describe(self) -> str:
        """The figures in one phrase."""
        text = f"RSS {self.rss_mb:.1f} MB"
        if s := self.stats:
            text += f", greenlets {s.greenlets}, open fds {s.open_fds}, connections {s.connections}"
        else:
            text += ", no answer to SIGUSR1"
        if self.upstream_open is not None:
            text += f", upstream connections open {self.upstream_open}"
        return text


@dataclasses.dataclass
class Fault:
    """A minute's fault: injected and healed at (s since the traffic began), its notes."""

    name: str
    injected_at: float | None = None
    healed_at: float = 0.0
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    under_fault: Stats | None = None

    def covers(self, at: float) -> bool:
        """Whether a request begun at `at` falls into the fault window."""
        return self.injected_at is not None and (
            self.injected_at - CLIENT_TIMEOUT <= at <= self.healed_at + GRACE
        )


@dataclasses.dataclass
class Minute:
    """What one minute measured; `endpoints` and `probe` as in the JSON file."""

    minute: int
    fault: Fault
    requests: int
    ok: int
    errors_by_kind: dict[str, int]
    outside_by_kind: dict[str, int]  # errors outside the fault window, by endpoint and kind
    status_500: int
    ended_session_accepted: int
    keepalive_retries: int
    endpoints: dict[str, dict[str, Any]]
    quiet: Quiet
    peak_rss_mb: float
    probe: dict[str, Any]
    last_error_after_heal_s: float | None

    @property
    def errors(self) -> int:
        return self.requests - self.ok

    @property
    def outside(self) -> int:
        return sum(self.outside_by_kind.values())


@dataclasses.dataclass
class Verdict:
    """Growth between the early and the late quiet points, and every flag raised."""

    baseline_minutes: list[int]
    final_minutes: list[int]
    indicative_only: bool
    growth: dict[str, dict[str, Any] | None]  # per GROWTH key: baseline, final, growth, ok
    rss_slope: dict[str, Any] | None
    flags: list[str]


# --- Clients: the workers, the health probe, the slow-header burst -----------------------


class Worker(h.Client):
    """A visitor with an account and a kept-alive connection: in a thread each minute, picks
    the next action at random, with fixed weights, until the minute's quiet point."""

    def __init__(self, soak: Soak, number: int, email: str) -> None:
        super().__init__(soak.port, CLIENT_TIMEOUT)
        self.soak, self.number, self.email, self.password = soak, number, email, h.PASSWORD
        self.maybe_password: str | None = None  # set when a reset's answer was lost
        self.cookie: str | None = None  # cc_auth
        self.visitor: str | None = None  # cc_app
        self.revoked: list[str] = []  # sessions that ended: they must answer 401
        self.rng = random.Random(soak.args.seed * 1000 + number)
        self.sequence = self.minute = 0
        self.thread: threading.Thread | None = None

    def retried(self) -> None:
        self.soak.retries.append(self.minute)

    def start(self, minute: int, deadline: float) -> threading.Thread | None:
        """A thread of actions until `deadline` (the minute's quiet point): its connection is
        closed then. None while the previous minute's is still busy."""
        if self.thread is not None and self.thread.is_alive():
            return None
        self.minute = minute
        self.thread = threading.Thread(target=self.loop, args=(deadline,), daemon=True)
        self.thread.start()
        return self.thread

    def loop(self, deadline: float) -> None:
        soak = self.soak
        for _ in range(int(QUIET_AT * MAX_ACTIONS_PER_SECOND)):
            if soak.stop.is_set() or time.monotonic() >= deadline:
                break
            self.sequence += 1
            action = self.rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
            if action in ("me", "me_revoked") and self.cookie is None:
                action = "login"
            try:
                getattr(self, f"act_{action}")()
            except Exception as exc:  # a bug of the soak's own: flagged, and keep going
                self.drop()
                if (text := f"{type(exc).__name__}: {exc}") not in soak.bugs:
                    say(f"client error (a bug of the soak, not of the server?): {text}")
                soak.bugs.append(text)
        self.drop()

    def record(self, endpoint: str, outcome: str, began: float, first: float | None = None) -> None:
        """Keep the result of one request: (endpoint, outcome, start, latency, first line)."""
        item = (endpoint, outcome, began - self.soak.t0, time.monotonic() - began, first)
        self.soak.records[self.minute].append(item)

    def cookies(self) -> dict[str, str]:
        """What a browser would send: the session and the chat visitor cookies."""
        return {"cc_auth": self.cookie or "", "cc_app": self.visitor or ""}

    def plain(self, endpoint: str, method: str, path: str, body: dict | None = None) -> int:
        """A request whose only good answer is 200, recorded; its status."""
        began = time.monotonic()
        answer = self.exchange(method, path, body, self.cookies())
        self.record(endpoint, answer.outcome(), began)
        return answer.status

    def act_healthz(self) -> None:
        self.plain("healthz", "GET", "/auth/healthz")

    def act_me(self) -> None:
        if self.plain("me", "GET", "/auth/me") == 401:
            self.cookie = None  # the session is gone: log in again

    def act_reset_chat(self) -> None:
        self.plain("reset_chat", "POST", "/reset_chat", {})

    def act_me_revoked(self) -> None:
        if not self.revoked:
            return self.act_me()
        began, ended = time.monotonic(), {"cc_auth": self.rng.choice(self.revoked)}
        answer = self.exchange("GET", "/auth/me", cookies=ended)
        outcome = "200 ended_session_accepted" if answer.status == 200 else answer.outcome(401)
        self.record("me_revoked", outcome, began)

    def act_login(self) -> None:
        previous, began = self.cookie, time.monotonic()
        body = {"identifier": self.email, "password": self.password}
        answer = self.exchange("POST", "/auth/login", body, self.cookies())
        if answer.status == 401 and self.maybe_password:
            # A reset whose answer was lost may have changed the password after all.
            self.record("login", "401 invalid_credentials (reset answer lost)", began)
            self.password, self.maybe_password = self.maybe_password, None
            return self.act_login()
        new = h.cookie_value(answer.response, "cc_auth") if answer.status == 200 else None
        if new:
            self.cookie, self.maybe_password = new, None
            if previous:
                self.remember_ended(previous)  # a login ends the session the browser sent
        elif answer.failure:
            self.cookie = None  # the old session may have ended: do not count on it
        outcome = "200 no_cookie" if answer.status == 200 and not new else answer.outcome()
        self.record("login", outcome, began)

    def remember_ended(self, cookie: str) -> None:
        """A session that must answer 401 from now on (the last 8 are kept)."""
        self.revoked = [*self.revoked[-7:], cookie]

    def act_password(self) -> None:
        began, token = time.monotonic(), None
        answer = self.exchange("POST", "/auth/password/forgot", {"identifier": self.email})
        if answer.status == 200:
            with contextlib.suppress(ValueError, AttributeError):
                token = json.loads(answer.body).get("debug_token")
        outcome = "200 no_token" if answer.status == 200 and not token else answer.outcome()
        self.record("forgot", outcome, began)
        if not token:
            return
        new, began = f"soak-{self.soak.tag}-{self.number}-{self.sequence}!", time.monotonic()
        answer = self.exchange("POST", "/auth/password/reset", {"token": token, "password": new})
        if answer.status == 200:
            self.password, self.maybe_password = new, None
            if self.cookie:
                self.remember_ended(self.cookie)  # the reset ends every session of the user
            self.cookie = None
        elif answer.failure:
            self.maybe_password = new  # no answer: it may or may not have happened
        self.record("reset", answer.outcome(), began)

    def act_chat(self, abort: bool = False) -> None:
        endpoint, first, last = "chat_abort" if abort else "chat", None, b""
        body = {"message": f"soak {self.number}-{self.sequence}: tell me something"}
        began = time.monotonic()
        try:
            response = self.send("POST", "/deepseek_chat", body, self.cookies())
            self.visitor = h.cookie_value(response, "cc_app") or self.visitor
            if response.status != 200:
                outcome = h.error_outcome(response.status, response.read())
                return self.record(endpoint, outcome, began)
            for _ in range(100_000):  # a reply is 50 lines; bounded whatever comes
                if not (line := response.readline(1 << 20)):
                    break
                if first is None:
                    first = time.monotonic() - began
                    if abort:
                        self.drop()  # the visitor leaves mid-answer
                        return self.record(endpoint, "ok", began, first)
                last = line
        except (OSError, http.client.HTTPException) as exc:
            self.drop()
            return self.record(endpoint, h.exception_outcome(exc), began)
        final: Any = None
        with contextlib.suppress(ValueError):
            final = json.loads(last)
        outcome = "200 stream_cut"
        if isinstance(final, dict) and (final.get("done") is True or "error" in final):
            outcome = "ok" if final.get("done") is True else "200 error_line"
        if outcome != "ok":
            self.drop()
        self.record(endpoint, outcome, began, first)

    def act_chat_abort(self) -> None:
        self.act_chat(abort=True)


class SlowHeaders:
    """N connections, each in a thread, that send a request line and then a header a byte
    a second until the server ends the connection or the burst is stopped."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count, self.stopped = port, count, threading.Event()
        self.ends: list[tuple[float, str]] = []  # (seconds after its first byte, how)
        self.failures: list[str] = []  # connect failures
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            sock.sendall(b"GET /auth/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sock.settimeout(1.0)
        except OSError as exc:
            return self.failures.append(type(exc).__name__)
        began, how = time.monotonic(), ""
        with sock:
            for _ in range(120):  # a byte a second for at most two minutes
                try:
                    data = sock.recv(4096)
                    how = data.split(b"\r\n", 1)[0].decode("latin-1")[:40] if data else "closed"
                except TimeoutError:
                    if self.stopped.is_set():
                        return
                    with contextlib.suppress(OSError):
                        sock.send(b"a")
                    continue
                except OSError as exc:
                    how = type(exc).__name__
                return self.ends.append((time.monotonic() - began, how))

    def stop(self) -> dict[str, Any]:
        """Close what is still open; what happened."""
        self.stopped.set()
        for thread in self.threads:
            thread.join(5)
        seconds = [s for s, _ in self.ends]

        def stat(f: Callable) -> float | None:
            return round(f(seconds), 2) if seconds else None

        return {
            "clients": self.count, "opened": self.count - len(self.failures),
            "connect_failures": len(self.failures), "ended_by_server": len(self.ends),
            "how": dict(Counter(how for _, how in self.ends)),
            "ended_after_s_min": stat(min), "ended_after_s_median": stat(statistics.median),
            "ended_after_s_max": stat(max),
            "still_open_at_heal": self.count - len(self.failures) - len(self.ends),
        }  # fmt: skip


# --- Faults: what inject() breaks and heal() puts right, both filling in the notes --------

FaultStep = Callable[["Soak", dict[str, Any]], Any]


def provider_fault(mode: str) -> tuple[FaultStep, FaultStep]:
    """The fake provider in `mode` (POST /control); the completions it spoiled meanwhile."""

    def inject(soak: Soak, notes: dict[str, Any]) -> None:
        notes["_before"] = soak.provider_stats().get("misbehaved", 0)
        h.provider_call(soak.provider_port, "POST", "/control", {"mode": mode})

    def heal(soak: Soak, notes: dict[str, Any]) -> None:
        h.provider_call(soak.provider_port, "POST", "/control", {"mode": "normal"})
        misbehaved = soak.provider_stats().get("misbehaved", 0) - notes.pop("_before", 0)
        notes["provider_requests_misbehaved"] = misbehaved

    return inject, heal


FAULTS: dict[str, tuple[FaultStep, FaultStep]] = {  # the order of the rotation
    "redis-stop": (
        lambda soak, notes: notes.update(stop_s=round(soak.redis.stop(), 2)),
        lambda soak, notes: notes.update(start_s=round(soak.redis.start(), 2)),
    ),
    "postgres-stop": (
        lambda soak, notes: notes.update(crash_s=round(soak.postgres.crash(), 2)),
        lambda soak, notes: notes.update(start_s=round(soak.postgres.start(), 2)),
    ),
    "provider-hang": provider_fault("hang"),
    "slow-headers": (
        lambda soak, notes: notes.update(_burst=SlowHeaders(soak.port, SLOW_CLIENTS)),
        lambda soak, notes: notes.update(notes.pop("_burst").stop()),
    ),
    "redis-hang": (lambda soak, _: soak.redis.pause(), lambda soak, _: soak.redis.pause(False)),
    "provider-reset": provider_fault("reset"),
    "provider-500": provider_fault("error500"),
    "provider-slow": provider_fault("slow"),
    "none": (lambda soak, _: None, lambda soak, _: None),
}
STORAGE_FAULTS = ("redis-stop", "postgres-stop", "redis-hang")
ROTATION = {
    "postgres": tuple(FAULTS)[:8],
    "embedded": tuple(f for f in tuple(FAULTS)[:8] if f not in STORAGE_FAULTS),
}


# --- The soak ----------------------------------------------------------------------------


class Soak:
    """Everything one soak run starts, measures and reports; close() stops it all."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.tag = f"{os.getpid()}{random.Random(args.seed).randrange(1000):03d}"
        self.stop, self.t0 = threading.Event(), time.monotonic()
        self.records: dict[int, list[tuple[str, str, float, float, float | None]]] = {}
        self.retries: list[int] = []  # the minute of each keep-alive retry
        self.bugs: list[str] = []  # the soak's own errors
        self.probes: list[h.Repeater] = []  # the health probe of each minute
        self.code = h.snapshot(args.server, workdir)
        self.processes: list[h.LoggedProcess] = []
        self.storage: h.Storage | None = None
        self.minutes: list[Minute] = []
        self.flags: list[str] = []
        self.start_sample = Quiet(False, 0.0, None, None)

    @property
    def redis(self) -> h.PrivateRedis:
        assert self.storage is not None and self.storage.redis is not None
        return self.storage.redis

    @property
    def postgres(self) -> h.PrivatePostgres:
        assert self.storage is not None and self.storage.postgres is not None
        return self.storage.postgres

    def start(self) -> None:
        """Provider, storage (a private Redis and PostgreSQL for setup postgres), server;
        the worker accounts."""
        args = self.args
        self.processes.append(provider := h.start_provider(self.workdir))
        self.provider_port = provider.port
        say(f"fake provider on port {provider.port}")
        self.storage = h.Storage.of_setup(args.setup, self.workdir, self.code, fsync=False)
        if args.setup == "postgres":
            say(
                f"private redis-server on port {self.redis.port}, private PostgreSQL"
                f" on port {self.postgres.port} ({self.postgres.dir})"
            )
        self.env = h.server_env(self.storage.env, provider.port) | {
            "DEEPSEEK_API_KEY": "soak", "DEBUG_RETURN_RESET_TOKEN": "1",
            "RATE_FORGOT_IP": h.RAISED_LIMIT, "RATE_FORGOT_IDENTIFIER": h.RAISED_LIMIT, **args.env,
        }  # fmt: skip
        self.server = h.start_server(self.code, self.env, self.workdir / "server.log")
        self.processes.append(self.server)
        self.port = self.server.port
        say(f"server PID {self.server.pid} on port {self.port} ({args.setup})")
        emails = [f"soak-{self.tag}-w{i}@example.com" for i in range(args.workers)]
        for email in emails:
            h.register_user(self.port, email)
        self.workers = [Worker(self, number, email) for number, email in enumerate(emails)]

    def provider_stats(self) -> dict[str, Any]:
        """The provider's counters ({} when it does not answer)."""
        try:
            return h.provider_call(self.provider_port, "GET", "/stats")
        except (OSError, http.client.HTTPException, ValueError, RuntimeError):
            return {}

    def server_stats(self, wait: float = 5.0) -> Stats | None:
        """SIGUSR1 and the `stats ...` line the server logs for it (None: no answer)."""
        offset = self.server.log_path.stat().st_size
        try:
            os.kill(self.server.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return None
        for _ in range(int(wait / 0.05)):
            with open(self.server.log_path, "rb") as log:
                log.seek(offset)
                if match := STATS_RE.search(log.read().decode("utf-8", "replace")):
                    return Stats(*map(int, match.groups()))
            time.sleep(0.05)
        return None

    def quiet_sample(self, threads: list[threading.Thread]) -> Quiet:
        """Let the clients finish their requests (15 s at most) and close their connections,
        let the server settle; RSS, SIGUSR1 stats, upstream connections."""
        deadline = time.monotonic() + 15
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        parked = not any(thread.is_alive() for thread in threads)
        time.sleep(1.0)  # the server closes the connections the clients closed
        rss = round(h.settle(self.server.pid, 2.0), 2)
        return Quiet(parked, rss, self.server_stats(), self.provider_stats().get("open"))

    def run(self) -> None:
        """The minutes: traffic, one fault each, a quiet point at the end of each."""
        args = self.args
        self.start_sample = self.quiet_sample([])
        say(f"before traffic: {self.start_sample.describe()}")
        self.t0 = planned = time.monotonic()
        for minute in range(1, args.minutes + 1):
            start = max(planned, time.monotonic())
            planned, self.records[minute] = start + MINUTE, []
            fault = Fault(args.faults[(minute - 1) % len(args.faults)])
            self.probes.append(probe := h.health_probe(self.port, every=0.5, limit=QUIET_AT))
            probe.timeout = CLIENT_TIMEOUT
            with h.RssSampler(self.server.pid) as rss:
                probe.thread.start()
                threads = [w.start(minute, start + QUIET_AT) for w in self.workers]
                sleep_until(start + FAULT_AT)
                if fault.name != "none":
                    self.inject(minute, start, fault)
                sleep_until(start + QUIET_AT)
                probe.stopped.set()
                quiet = self.quiet_sample([t for t in [*threads, probe.thread] if t])
            self.minutes.append(self.summarize(minute, start, fault, quiet, rss.peak))
            print(render_minute(self.minutes[-1], args.minutes), flush=True)
            if not self.server.alive():
                code = self.server.proc.returncode
                self.flags.append(f"the server exited (code {code}) in minute {minute}")
                break
            if minute < args.minutes:
                sleep_until(planned)

    def inject(self, minute: int, start: float, fault: Fault) -> None:
        """Inject the minute's fault at FAULT_AT, heal it --fault-seconds later."""
        inject, heal = FAULTS[fault.name]
        fault.injected_at = round(time.monotonic() - self.t0, 2)
        try:
            inject(self, fault.notes)
            sleep_until(start + FAULT_AT + self.args.fault_seconds / 2)
            fault.under_fault = self.server_stats(2.0)
            sleep_until(start + FAULT_AT + self.args.fault_seconds)
        except Exception as exc:
            self.flags.append(f"minute {minute}: injecting {fault.name}: {exc!r}")
        finally:
            try:
                heal(self, fault.notes)
            except Exception as exc:
                self.flags.append(f"minute {minute}: healing {fault.name}: {exc!r}")
        fault.healed_at = round(time.monotonic() - self.t0, 2)
        say(f"minute {minute}: {fault.name} injected and healed {fault.notes}")

    def summarize(
        self, minute: int, start: float, fault: Fault, quiet: Quiet, peak: float
    ) -> Minute:
        """The minute's requests, errors, latencies, health probes and server figures."""
        records = list(self.records.get(minute, []))
        errors = [r for r in records if r[1] != "ok"]
        endpoints = {}
        for name in ENDPOINTS:
            if mine := [r for r in records if r[0] == name]:
                latencies, firsts = [r[3] for r in mine], [r[4] for r in mine if r[4] is not None]
                endpoints[name] = {
                    "requests": len(mine), "ok": sum(1 for r in mine if r[1] == "ok"),
                    "outcomes": dict(Counter(r[1] for r in mine if r[1] != "ok")),
                    "p50_ms": h.ms(h.percentile(latencies, 50)),
                    "p99_ms": h.ms(h.percentile(latencies, 99)), "max_ms": h.ms(max(latencies)),
                    "first_line_p99_ms": h.ms(h.percentile(firsts, 99)),
                }  # fmt: skip
        probes = [(at - self.t0, o, s) for at, o, s in self.probes[minute - 1].samples]
        probe = dataclasses.asdict(h.tally([self.probes[minute - 1]], MINUTE))
        probe["outcomes"] = dict(Counter(o for _, o, _ in probes if o != "ok"))
        late = None
        if fault.injected_at is not None:
            bad = [p for p in probes if p[0] >= fault.injected_at and p[1] != "ok"]
            good = [p for p in probes if p[0] >= fault.healed_at and p[1] == "ok"]
            probe["failed_after_s"] = round(bad[0][0] - fault.injected_at, 2) if bad else None
            if bad and good:
                back = good[0][0] + good[0][2] - fault.healed_at
                probe["ok_again_after_heal_s"] = round(back, 2)
            if after := [r[2] for r in errors if r[2] >= fault.healed_at]:
                late = round(max(after) - fault.healed_at, 2)
        return Minute(
            minute, fault, len(records), len(records) - len(errors),
            dict(Counter(r[1] for r in errors).most_common()),
            dict(Counter(f"{r[0]} {r[1]}" for r in errors if not fault.covers(r[2]))),
            sum(1 for r in records if r[1].startswith("500")),
            sum(1 for r in records if r[1] == "200 ended_session_accepted"),
            self.retries.count(minute), endpoints, quiet, round(peak, 2), probe, late,
        )  # fmt: skip

    def verdict(self) -> Verdict:
        """Growth between the early and the late quiet points; everything else flagged."""
        quiets = {m.minute: m.quiet for m in self.minutes} | {0: self.start_sample}
        count = len(self.minutes)
        if count >= 5:
            base, end = [2, 3], [count - 1, count]
        else:
            base, end = {0: ([], []), 1: ([0], [1]), 2: ([1], [2])}.get(count, ([2], [count]))
        result = Verdict(base, end, count < 5, {}, None, list(self.flags))
        flags = result.flags
        for key, limit, label in GROWTH if base else ():
            before = [v for n in base if (v := quiets[n].figure(key)) is not None]
            after = [v for n in end if (v := quiets[n].figure(key)) is not None]
            if not before or not after:
                result.growth[key] = None
                flags.append(f"{label}: no figure for minutes {base} or {end}")
                continue
            mean_or_max = statistics.mean if key == "rss_mb" else max
            first, last = mean_or_max(before), mean_or_max(after)
            grew = last - first > limit
            result.growth[key] = {
                "baseline": round(first, 2), "final": round(last, 2),
                "growth": round(last - first, 2), "ok": not grew,
            }  # fmt: skip
            if grew and base != [0]:  # against the cold start, growth is the warm-up
                flags.append(f"{label} grew from {first:.1f} to {last:.1f} (limit +{limit})")
        # A step (a burst raised the allocator's high-water mark) is not a leak; a steady
        # climb is: the least-squares slope of the quiet-point RSS over the second half.
        half = [(m.minute, m.quiet.rss_mb) for m in self.minutes if m.minute > count // 2]
        if len(half) >= 3:
            slope = statistics.linear_regression(*zip(*half, strict=True)).slope
            span, ok = [half[0][0], half[-1][0]], slope <= RSS_SLOPE_LIMIT
            result.rss_slope = {"minutes": span, "mb_per_minute": round(slope, 3), "ok": ok}
            if not ok:
                flags.append(
                    f"RSS climbs {slope:+.2f} MB a minute over minutes {span[0]}-{span[1]}"
                    f" (limit +{RSS_SLOPE_LIMIT})"
                )
        for m in self.minutes:
            at, upstream = f"minute {m.minute}:", m.quiet.upstream_open
            if m.quiet.stats is None:
                flags.append(f"{at} no answer to SIGUSR1 within 5 s (hung?)")
            if not m.quiet.all_parked:
                flags.append(f"{at} a client did not finish its request in 15 s")
            if m.status_500:
                flags.append(f"{at} {m.status_500} answers with status 500")
            if m.outside:
                kinds = m.outside_by_kind
                flags.append(f"{at} {m.outside} errors outside the fault window: {kinds}")
            if m.ended_session_accepted:
                flags.append(f"{at} {m.ended_session_accepted} ended sessions answered 200")
            if upstream is not None and upstream > UPSTREAM_IDLE:
                flags.append(
                    f"{at} {upstream} upstream connections open at the quiet point"
                    f" (idle pool {UPSTREAM_IDLE})"
                )
        bugs = Counter(self.bugs).items()
        flags += [f"client-side error in the soak itself ({n}x): {text}" for text, n in bugs]
        return result

    def finish(self) -> h.LogFacts:
        """Stop the server (a clean exit is expected) and read its log; keep the logs."""
        began = time.monotonic()
        self.server.stop()
        facts = h.LogFacts.read(self.server.log_text())
        facts.exit_code = self.server.proc.returncode
        facts.shutdown_s = round(time.monotonic() - began, 2)
        if facts.exit_code != 0:
            self.flags.append(f"the server exited with code {facts.exit_code} on SIGTERM")
        if facts.tracebacks:
            self.flags.append(f"{facts.tracebacks} tracebacks in the server log")
        if facts.status_500_lines:
            self.flags.append(f"{facts.status_500_lines} requests logged with status 500")
        logs = [self.server.log_path, self.processes[0].log_path]
        if self.args.setup == "postgres":
            logs += [self.redis.log_path, self.postgres.log_path]
        for log, name in zip(logs, ("server", "provider", "redis", "postgres"), strict=False):
            h.keep_log(self.args.keep_logs, log, f"{name}.log")
        return facts

    def close(self) -> None:
        """Stop whatever still runs, by PID (a no-op for what already stopped)."""
        self.stop.set()
        for process in self.processes:
            process.stop()
        if self.storage is not None:
            self.storage.close()


# --- Output ------------------------------------------------------------------------------


def kinds_text(kinds: dict[str, int], top: int = 99) -> str:
    """'kind n, kind n' for the most frequent kinds."""
    items = sorted(kinds.items(), key=lambda item: -item[1])
    return ", ".join(f"{kind} {count:,}" for kind, count in items[:top]) or "-"


def fmt(value: float | None, digits: int = 1) -> str:
    """A figure, '-' for none."""
    return "-" if value is None else f"{value:,.{digits}f}"


def render_minute(m: Minute, total: int) -> str:
    """The report printed at the end of every minute."""
    fault, probe = m.fault, m.probe
    if fault.injected_at is not None:
        notes = " (" + ", ".join(f"{k} {v}" for k, v in fault.notes.items()) + ")"
        shows, last = "200 throughout", "no client error after healing"
        if probe["failed_after_s"] is not None:
            shows = f"failing {probe['failed_after_s']:.1f} s after the injection, 200 again"
            shows += f" {fmt(probe.get('ok_again_after_heal_s'))} s after healing"
        if m.last_error_after_heal_s is not None:
            last = f"last client error {m.last_error_after_heal_s:.1f} s after healing"
        out = [
            f"== minute {m.minute}/{total}: {fault.name} at {fault.injected_at:.1f} s, healed at"
            f" {fault.healed_at:.1f} s{notes if fault.notes else ''}",
            f"   healthz probe: {shows}; slowest probe {fmt(probe['max_ms'])} ms; {last}",
        ]
    else:
        out = [f"== minute {m.minute}/{total}: no fault"]
        out.append(f"   healthz probe: slowest {fmt(probe['max_ms'])} ms")
    out.append(
        f"   requests {m.requests:,}: ok {m.ok:,}, errors {m.errors:,} (in the fault window"
        f" {m.errors - m.outside:,}, outside {m.outside:,}), status 500: {m.status_500},"
        f" keep-alive retries {m.keepalive_retries}"
    )
    out.append(f"   errors by kind: {kinds_text(m.errors_by_kind)}")
    rows = [("endpoint", "requests", "ok", "p50 ms", "p99 ms", "errors by kind")]
    for name, e in m.endpoints.items():
        counts = f"{e['requests']:,}", f"{e['ok']:,}", fmt(e["p50_ms"]), fmt(e["p99_ms"])
        rows.append((name, *counts, kinds_text(e["outcomes"], 4)))
    out += ["     " + line for line in h.text_table(rows, "lrrrr-", rule=False)]
    out.append(
        f"   server at the quiet point: {m.quiet.describe()}; peak RSS this minute"
        f" {m.peak_rss_mb:.1f} MB"
    )
    if under := fault.under_fault:
        out.append(
            f"   under the fault: connections {under.connections}, greenlets {under.greenlets},"
            f" open fds {under.open_fds}, RSS {under.rss_kib / 1024:.1f} MB"
        )
    return "\n".join(out)


def render_table(start: Quiet, minutes: list[Minute]) -> str:
    """One line per minute, the quiet point before the traffic first."""
    header = "min,fault,requests,errors,outside,500s,RSS MB,peak MB,greenlets,fds,back s"
    rows = [(*header.split(","), "errors by kind")]
    for m in [None, *minutes]:
        quiet = m.quiet if m else start
        stats = [str(getattr(quiet.stats, key, "-")) for key in ("greenlets", "open_fds")]
        if m is None:
            empty = ("", "", "", "")
            rows.append(("0", "(before traffic)", *empty, fmt(start.rss_mb), "", *stats, "", ""))
            continue
        rows.append(
            (
                str(m.minute), m.fault.name, f"{m.requests:,}", f"{m.errors:,}", f"{m.outside:,}",
                str(m.status_500), fmt(quiet.rss_mb), fmt(m.peak_rss_mb), *stats,
                fmt(m.probe.get("ok_again_after_heal_s")), kinds_text(m.errors_by_kind, 3),
            )
        )  # fmt: skip
    return "\n".join(h.text_table(rows, "rlrrrrrrrrr-"))


def render_verdict(verdict: Verdict, log: h.LogFacts | None) -> str:
    """Growth, flags, and the server log's findings."""
    base, end = verdict.baseline_minutes, verdict.final_minutes
    out = ["growth: no whole minute to compare"]
    if base:
        named = "before traffic" if base == [0] else f"minute(s) {'-'.join(map(str, base))}"
        caveat = ""
        if base == [0]:
            caveat = " (a cold start: pools fill up, growth is shown, not flagged)"
        elif verdict.indicative_only:
            caveat = " (indicative only: fewer than 5 minutes)"
        finals = "-".join(map(str, end))
        out = [f"growth, quiet points of {named} against minute(s) {finals}{caveat}:"]
    for key, limit, label in GROWTH if base else ():
        if (g := verdict.growth.get(key)) is None:
            out.append(f"  {label:<10} no figures")
            continue
        state = "ok" if g["ok"] else ("warm-up" if base == [0] else "GROWTH")
        out.append(
            f"  {label:<10} {g['baseline']:8.1f} -> {g['final']:8.1f}  {g['growth']:+6.1f}"
            f" (limit +{limit})  {state}"
        )
    if slope := verdict.rss_slope:
        (first, last), state = slope["minutes"], "ok" if slope["ok"] else "CLIMBING"
        out.append(
            f"  RSS trend over minutes {first}-{last}: {slope['mb_per_minute']:+.3f} MB a minute"
            f" (limit +{RSS_SLOPE_LIMIT})  {state}"
        )
    if log is not None:
        out.append(
            f"server log: {log.lines:,} lines, {log.tracebacks} tracebacks, {log.error_lines}"
            f" ERROR lines, {log.status_500_lines} requests with status 500; exit code"
            f" {log.exit_code} after SIGTERM ({log.shutdown_s:.1f} s)"
        )
        if log.status_5xx_by_route:
            out.append(f"  5xx by route: {kinds_text(log.status_5xx_by_route, 8)}")
        if log.complaints:
            out.append("  warnings and errors by kind:")
            out += [f"    {n:6,}  {kind[:150]}" for kind, n in list(log.complaints.items())[:12]]
        for excerpt in log.traceback_excerpts:
            out.append("  traceback:\n" + "\n".join("    " + line for line in excerpt.splitlines()))
    if flags := verdict.flags:
        out.append(f"verdict: FLAGGED ({len(flags)})")
        out.extend(f"  - {flag}" for flag in flags)
    else:
        out.append("verdict: ok (no 500, no traceback, no error outside the fault windows,")
        out.append("         no growth past the thresholds)")
    return "\n".join(out)


# --- main() ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    h.common_options(parser, "postgres")
    add = parser.add_argument
    add("--minutes", type=int, default=10, help="minutes of traffic (1..120)")
    add("--workers", type=int, default=12, help="client threads (1..64)")
    add("--faults", default="", help=f"the rotation, one a minute: {','.join(FAULTS)}")
    add("--fault-seconds", type=float, default=12.0, help="how long each fault lasts (1..30)")
    add("--seed", type=int, default=1, help="seed of the workers' choices")
    args = parser.parse_args(argv)
    if not 1 <= args.minutes <= 120 or not 1 <= args.workers <= 64:
        parser.error("keep --minutes in 1..120 and --workers in 1..64")
    if not 1 <= args.fault_seconds <= 30:
        parser.error("keep --fault-seconds in 1..30")
    faults = [f.strip() for f in args.faults.split(",") if f.strip()] or list(ROTATION[args.setup])
    if unknown := set(faults) - set(FAULTS):
        parser.error(f"unknown fault(s) {', '.join(sorted(unknown))}; use {', '.join(FAULTS)}")
    if args.setup == "embedded" and set(faults) & set(STORAGE_FAULTS):
        parser.error(f"setup embedded has no Redis or PostgreSQL to break: {STORAGE_FAULTS}")
    args.faults, args.env = faults, h.parse_env(parser, args.env)
    return args


def main(argv: list[str] | None = None) -> int:
    """Start everything, run the minutes, report, clean up."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(f"signal {signum}"))
    started, box = dt.datetime.now(dt.UTC), h.Machine.now()
    print(
        f"CloudChat soak, setup {args.setup}, {args.minutes} minute(s), {args.workers} workers,"
        f" faults {','.join(args.faults)} ({args.fault_seconds:g} s at {FAULT_AT:g} s into each"
        f" minute); {box.line()}",
        flush=True,
    )
    log: h.LogFacts | None = None
    with tempfile.TemporaryDirectory(prefix="cc-soak-", ignore_cleanup_errors=True) as tmp:
        soak = Soak(args, Path(tmp))
        try:
            soak.start()
            print(soak.code.line(), flush=True)
            try:
                soak.run()
            except (KeyboardInterrupt, SystemExit):
                soak.flags.append("interrupted: the figures stop at the last whole minute")
                say("interrupted: stopping and cleaning up")
            log = soak.finish()
        finally:
            soak.close()
    verdict = soak.verdict()
    print(f"\n{render_table(soak.start_sample, soak.minutes)}\n\n{render_verdict(verdict, log)}")
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "setup": args.setup,
        "minutes": args.minutes, "workers": args.workers, "faults": args.faults,
        "fault_seconds": args.fault_seconds, "fault_at_s": FAULT_AT, "quiet_at_s": QUIET_AT,
        "client_timeout_s": CLIENT_TIMEOUT, "grace_s": GRACE, "weights": WEIGHTS,
        "seed": args.seed, "server": soak.code, "machine": box,
        "server_settings": {k: v for k, v in soak.env.items() if k not in ("PATH", "LANG")},
        "started": started.isoformat(timespec="seconds"),
    }  # fmt: skip
    probe_samples = [sample for probe in soak.probes for sample in probe.samples]
    record = {"meta": meta, "before_traffic": soak.start_sample, "minutes": soak.minutes}
    samples = [(round(t - soak.t0, 2), o, round(s * 1000, 1)) for t, o, s in probe_samples]
    record |= {"verdict": verdict, "server_log": log, "probe_samples": samples}
    out = args.json or h.BENCH / "results" / f"soak-{args.setup}-{started:%Y%m%d-%H%M%S}.json"
    h.write_json(out, record)
    return 1 if verdict.flags else 0


if __name__ == "__main__":
    sys.exit(main())
