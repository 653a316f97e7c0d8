"""CloudChat soak test: mixed traffic for N minutes with a fault injected every minute.

    .venv/bin/python bench/soak.py [--minutes 10] [--setup postgres|embedded] [--json out.json]
                                   [--workers 12] [--faults NAME,...] [--fault-seconds 12]
                                   [--seed 1] [--env NAME=VALUE] [--keep-logs DIR]

Not part of CI: ten minutes by default (`--minutes 1` for a quick check). bench/README.md
("Soak") says what it starts (a private redis-server and PostgreSQL cluster for setup
postgres, bench/provider.py, a snapshot of the server), the traffic and its weights, the
faults, the quiet point at the end of every minute, the growth verdict and the flags.
Loopback only; every loop is bounded in count and time; every process started here is
stopped by its PID (PostgreSQL by `pg_ctl`); the temporary folders, the cluster and the
Redis data go at the end, even after Ctrl-C.
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
import shutil
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

import harness  # bench/ is sys.path[0] when this file runs as a script

MINUTE, FAULT_AT, QUIET_AT = 60.0, 15.0, 57.0  # the fault and the quiet point: s into a minute
CLIENT_TIMEOUT = 5.0  # no byte for this long: the request counts as a timeout
GRACE = 10.0  # errors up to this long after the healing still belong to the fault
MONITOR_EVERY = 0.5
SLOW_CLIENTS = 200
RSS_LIMIT_MB, GREENLET_TOLERANCE, FD_TOLERANCE = 3.0, 5, 8
RSS_SLOPE_LIMIT = 0.25  # MB per minute over the second half of the run: a steady climb
UPSTREAM_IDLE = 4  # the server keeps this many idle provider connections for reuse
MAX_ACTIONS_PER_SECOND = 200  # per worker: the hard cap on any worker's loop
GROWTH = (  # quiet-point figure, its limit, its label
    ("rss_mb", RSS_LIMIT_MB, "RSS (MB)"),
    ("greenlets", GREENLET_TOLERANCE, "greenlets"),
    ("open_fds", FD_TOLERANCE, "open fds"),
)
WEIGHTS = dict(me=34, healthz=8, login=8, chat=24, chat_abort=4, reset_chat=6, password=4)
WEIGHTS["me_revoked"] = 4
ENDPOINTS = "healthz me me_revoked login chat chat_abort reset_chat forgot reset".split()
STATS_RE = re.compile(r"stats connections=(\d+) greenlets=(\d+) open_fds=(\d+) rss_kib=(\d+)\n")
REQUEST_LINE_RE = re.compile(r" cloudchat: ([A-Z]+) (\S+) (\d{3}) [\d.]+ms rid=")
TRACEBACK = "Traceback (most recent call last)"


def say(text: str) -> None:
    """Progress on stderr (the minute reports and the table go to stdout)."""
    harness.say("soak", text)


def sleep_until(moment: float, stop: threading.Event | None = None) -> None:
    """Sleep until time.monotonic() reaches `moment` (or `stop` is set)."""
    delay = moment - time.monotonic()
    if delay > 0:
        stop.wait(delay) if stop is not None else time.sleep(delay)


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds, rounded."""
    return None if seconds is None else round(seconds * 1000, 1)


# --- Clients: the workers, the health probe, the slow-header burst -----------------------


@dataclasses.dataclass(slots=True)
class Record:
    """One request as the client saw it; `at` is seconds since the soak's traffic began."""

    minute: int
    endpoint: str
    outcome: str  # "ok", "<status> <code>", or a connection failure kind
    at: float
    latency: float
    first_line: float | None = None


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


def outcome_of(status: int, body: bytes, failure: str) -> str:
    """'ok' for a 200, else the failure kind or '<status> <code>'."""
    return "ok" if status == 200 else failure or error_outcome(status, body)


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


def status_of(outcome: str) -> int:
    """The HTTP status in an outcome label, 0 for none."""
    head = outcome.split(" ", 1)[0]
    return int(head) if head.isdigit() else 0


def cookie_value(response: http.client.HTTPResponse | None, name: str) -> str | None:
    """The value a response's Set-Cookie headers give `name` (None when they do not)."""
    for header in (response.msg.get_all("Set-Cookie") or ()) if response else ():
        key, _, value = header.split(";", 1)[0].partition("=")
        if key.strip() == name and value:
            return value
    return None


class Gate:
    """Lets the clients run, or parks them (connections closed) for a quiet point."""

    def __init__(self) -> None:
        self.opened, self._cond, self.parked = threading.Event(), threading.Condition(), 0

    def park(self, stop: threading.Event, deadline: float) -> None:
        """Called by a client whose connection is closed: wait until the gate opens."""
        with self._cond:
            self.parked += 1
            self._cond.notify_all()
        while not self.opened.wait(0.5) and not stop.is_set() and time.monotonic() <= deadline:
            pass
        with self._cond:
            self.parked -= 1

    def close(self, parties: int, timeout: float) -> bool:
        """Ask every client to finish its request and park; True when all `parties` did."""
        self.opened.clear()
        with self._cond:
            return self._cond.wait_for(lambda: self.parked >= parties, timeout)


class Client:
    """A thread with one kept-alive connection to the server; stops at the soak's deadline."""

    def __init__(self, soak: Soak, name: str) -> None:
        self.soak, self.conn = soak, None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def drop(self) -> None:
        """Close the connection (the next request opens another)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(
        self, method: str, path: str, body: dict | None, cookies: dict[str, str]
    ) -> http.client.HTTPResponse:
        """Send a request and read the status line and headers.

        A kept-alive connection the server closed while it idled fails before any answer;
        like a browser, try once more on a fresh one (counted as a keep-alive retry).
        """
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if cookie := "; ".join(f"{k}={v}" for k, v in cookies.items() if v):
            headers["Cookie"] = cookie
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(
                    "127.0.0.1", self.soak.port, timeout=CLIENT_TIMEOUT
                )
            reused = self.conn.sock is not None
            try:
                self.conn.request(method, path, data, headers)
                return self.conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.drop()
                if reused and attempt == 1:
                    self.soak.count_retry()
                    continue
                raise
            except BaseException:
                self.drop()
                raise
        raise AssertionError("unreachable")

    def exchange(
        self, method: str, path: str, body: dict | None = None, cookies: dict | None = None
    ) -> tuple[int, bytes, http.client.HTTPResponse | None, str]:
        """One whole request: status (0 on failure), body, response, failure kind."""
        try:
            response = self.send(method, path, body, cookies or {})
            return response.status, response.read(), response, ""
        except (OSError, http.client.HTTPException) as exc:
            self.drop()
            return 0, b"", None, exception_outcome(exc)

    def _loop(self) -> None:
        soak = self.soak
        count, cap = 0, int(soak.deadline - time.monotonic() + 1) * MAX_ACTIONS_PER_SECOND
        while not soak.stop.is_set() and time.monotonic() < soak.deadline and count < cap:
            if not soak.gate.opened.is_set():
                self.drop()
                soak.gate.park(soak.stop, soak.deadline)
                continue
            count += 1
            try:
                self.step()
            except Exception as exc:  # a bug of the soak's own: say so, keep going
                self.drop()
                soak.client_bug(f"{type(exc).__name__}: {exc}")
        self.drop()

    def step(self) -> None:
        """One action."""
        raise NotImplementedError


class Worker(Client):
    """A visitor with an account: picks the next action at random, with fixed weights."""

    def __init__(self, soak: Soak, number: int, email: str) -> None:
        super().__init__(soak, f"worker-{number}")
        self.number, self.email, self.password = number, email, harness.PASSWORD
        self.maybe_password: str | None = None  # set when a reset's answer was lost
        self.cookie: str | None = None  # cc_auth
        self.visitor: str | None = None  # cc_app
        self.revoked: list[str] = []  # sessions that ended: they must answer 401
        self.rng = random.Random(soak.args.seed * 1000 + number)
        self.sequence = 0

    def record(self, endpoint: str, outcome: str, began: float, first: float | None = None) -> None:
        """Keep the result of one request."""
        self.soak.record(endpoint, outcome, began, time.monotonic() - began, first)

    def plain(self, endpoint: str, method: str, path: str, body: dict | None = None) -> int:
        """A request whose only good answer is 200, recorded; its status."""
        began = time.monotonic()
        status, data, _, failure = self.exchange(method, path, body, self.cookies())
        self.record(endpoint, outcome_of(status, data, failure), began)
        return status

    def cookies(self) -> dict[str, str]:
        """What a browser would send: the session and the chat visitor cookies."""
        return {"cc_auth": self.cookie or "", "cc_app": self.visitor or ""}

    def step(self) -> None:
        self.sequence += 1
        action = self.rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
        if action in ("me", "me_revoked") and self.cookie is None:
            action = "login"
        getattr(self, f"act_{action}")()

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
        ended, began = self.rng.choice(self.revoked), time.monotonic()
        status, data, _, failure = self.exchange("GET", "/auth/me", cookies={"cc_auth": ended})
        if status == 200:
            outcome = "200 ended_session_accepted"
        else:
            outcome = "ok" if status == 401 else failure or error_outcome(status, data)
        self.record("me_revoked", outcome, began)

    def act_login(self) -> None:
        previous, began = self.cookie, time.monotonic()
        body = {"identifier": self.email, "password": self.password}
        status, data, response, failure = self.exchange("POST", "/auth/login", body, self.cookies())
        if status == 401 and self.maybe_password:
            # A reset whose answer was lost may have changed the password after all.
            self.record("login", "401 invalid_credentials (reset answer lost)", began)
            self.password, self.maybe_password = self.maybe_password, None
            return self.act_login()
        new = cookie_value(response, "cc_auth") if status == 200 else None
        if status == 200 and new:
            self.cookie, self.maybe_password, outcome = new, None, "ok"
            if previous:
                self.remember_ended(previous)  # a login ends the session the browser sent
        elif status == 200:
            outcome = "200 no_cookie"
        else:
            outcome = failure or error_outcome(status, data)
            if failure:
                self.cookie = None  # the old session may have ended: do not count on it
        self.record("login", outcome, began)

    def remember_ended(self, cookie: str) -> None:
        """A session that must answer 401 from now on (the last 8 are kept)."""
        self.revoked = [*self.revoked[-7:], cookie]

    def act_password(self) -> None:
        began = time.monotonic()
        forgot = {"identifier": self.email}
        status, data, _, failure = self.exchange("POST", "/auth/password/forgot", forgot)
        token = None
        if status == 200:
            with contextlib.suppress(ValueError):
                parsed = json.loads(data)
                token = parsed.get("debug_token") if isinstance(parsed, dict) else None
            outcome = "ok" if token else "200 no_token"
        else:
            outcome = failure or error_outcome(status, data)
        self.record("forgot", outcome, began)
        if not token:
            return
        new, began = f"soak-{self.soak.tag}-{self.number}-{self.sequence}!", time.monotonic()
        body = {"token": token, "password": new}
        status, data, _, failure = self.exchange("POST", "/auth/password/reset", body)
        if status == 200:
            self.password, self.maybe_password = new, None
            if self.cookie:
                self.remember_ended(self.cookie)  # the reset ends every session of the user
            self.cookie = None
            self.record("reset", "ok", began)
        else:
            if failure:
                self.maybe_password = new  # no answer: it may or may not have happened
            self.record("reset", failure or error_outcome(status, data), began)

    def act_chat(self, abort: bool = False) -> None:
        endpoint, first, last = "chat_abort" if abort else "chat", None, b""
        self.sequence += 1
        body = {"message": f"soak {self.number}-{self.sequence}: tell me something"}
        began = time.monotonic()
        try:
            response = self.send("POST", "/deepseek_chat", body, self.cookies())
            self.visitor = cookie_value(response, "cc_app") or self.visitor
            if response.status != 200:
                return self.record(endpoint, error_outcome(response.status, response.read()), began)
            for _ in range(100_000):  # a reply is 50 lines; bounded whatever comes
                line = response.readline(1 << 20)
                if not line:
                    break
                if first is None:
                    first = time.monotonic() - began
                    if abort:
                        self.drop()  # the visitor leaves mid-answer
                        return self.record(endpoint, "ok", began, first)
                last = line
        except (OSError, http.client.HTTPException) as exc:
            self.drop()
            return self.record(endpoint, exception_outcome(exc), began)
        outcome = "200 stream_cut"
        with contextlib.suppress(ValueError):
            final = json.loads(last)
            if isinstance(final, dict) and final.get("done") is True:
                outcome = "ok"
            elif isinstance(final, dict) and "error" in final:
                outcome = "200 error_line"
        if outcome != "ok":
            self.drop()
        self.record(endpoint, outcome, began, first)

    def act_chat_abort(self) -> None:
        self.act_chat(abort=True)


class HealthMonitor(Client):
    """GET /auth/healthz every 0.5 s: when a fault shows, when it is over, loop stalls."""

    def __init__(self, soak: Soak) -> None:
        super().__init__(soak, "healthz-monitor")
        self.samples: list[tuple[int, float, str, float]] = []  # (minute, at, outcome, ms)
        self._next = time.monotonic()

    def step(self) -> None:
        sleep_until(self._next, self.soak.stop)
        self._next = max(self._next + MONITOR_EVERY, time.monotonic())
        began = time.monotonic()
        status, data, _, failure = self.exchange("GET", "/auth/healthz")
        latency_ms = (time.monotonic() - began) * 1000
        outcome = outcome_of(status, data, failure)
        self.samples.append((self.soak.minute, began - self.soak.t0, outcome, latency_ms))


class SlowHeaders:
    """N connections that send a request line and then a header a byte a second."""

    def __init__(self, port: int, count: int, limit: float) -> None:
        self.port, self.count, self.limit = port, count, limit
        self.opened = self.connect_failures = self.left_open = 0
        self.ends: list[tuple[float, str]] = []  # (seconds after its first byte, how)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-headers", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """Close what is still open; what happened."""
        self._stop.set()
        self._thread.join(30)
        seconds = [s for s, _ in self.ends]

        def stat(f: Callable) -> float | None:
            return round(f(seconds), 2) if seconds else None

        return {
            "clients": self.count, "opened": self.opened,
            "connect_failures": self.connect_failures, "ended_by_server": len(self.ends),
            "how": dict(Counter(how for _, how in self.ends)),
            "ended_after_s_min": stat(min), "ended_after_s_median": stat(statistics.median),
            "ended_after_s_max": stat(max), "still_open_at_heal": self.left_open,
        }  # fmt: skip

    def _run(self) -> None:
        began, open_ones = time.monotonic(), []
        try:
            for _ in range(self.count):
                if self._stop.is_set():
                    break
                try:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                    sock.sendall(b"GET /auth/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                    sock.setblocking(False)
                    open_ones.append((sock, time.monotonic()))
                    self.opened += 1
                except OSError:
                    self.connect_failures += 1
            tick = 0
            while not self._stop.wait(0.5) and time.monotonic() - began < self.limit + 30:
                tick += 1
                still = []
                for sock, first_byte in open_ones:
                    if how := self._poll(sock, send=tick % 2 == 0):
                        self.ends.append((time.monotonic() - first_byte, how))
                        sock.close()
                    else:
                        still.append((sock, first_byte))
                open_ones = still
        finally:
            self.left_open = len(open_ones)
            for sock, _ in open_ones:
                sock.close()

    @staticmethod
    def _poll(sock: socket.socket, send: bool) -> str:
        """'' while the server keeps waiting; how it ended the connection otherwise."""
        try:
            data = sock.recv(4096)
            return data.split(b"\r\n", 1)[0].decode("latin-1")[:40] if data else "closed"
        except BlockingIOError:
            pass
        except OSError as exc:
            return type(exc).__name__
        try:
            if send:
                sock.send(b"a")
        except BlockingIOError:
            pass
        except OSError as exc:
            return type(exc).__name__
        return ""


# --- Faults: what inject() breaks and heal() puts right, both filling in the minute's notes

FaultStep = Callable[["Soak", dict[str, Any]], Any]


def provider_fault(mode: str) -> tuple[FaultStep, FaultStep]:
    """The fake provider in `mode` (POST /control); the completions it spoiled meanwhile."""

    def inject(soak: Soak, notes: dict[str, Any]) -> None:
        notes["_before"] = soak.provider_stats().get("misbehaved", 0)
        soak.provider_control(mode)

    def heal(soak: Soak, notes: dict[str, Any]) -> None:
        before = notes.pop("_before", 0)
        soak.provider_control("normal")
        after = soak.provider_stats().get("misbehaved", 0)
        notes["provider_requests_misbehaved"] = after - before

    return inject, heal


def burst_start(soak: Soak, notes: dict[str, Any]) -> None:
    """SLOW_CLIENTS connections trickling their headers."""
    notes["_burst"] = SlowHeaders(soak.port, SLOW_CLIENTS, soak.args.fault_seconds)


def burst_stop(soak: Soak, notes: dict[str, Any]) -> None:
    """Close the burst's connections; how the server ended the others."""
    if (burst := notes.pop("_burst", None)) is not None:
        notes.update(burst.stop())


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
    "slow-headers": (burst_start, burst_stop),
    "redis-hang": (lambda soak, _: soak.redis.pause(), lambda soak, _: soak.redis.resume()),
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
    """Everything one soak run starts, measures and reports."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = f"{os.getpid()}{random.Random(args.seed).randrange(1000):03d}"
        self.stop, self.gate, self._lock = threading.Event(), Gate(), threading.Lock()
        self.minute, self.port = 0, 0
        self.t0 = self.deadline = time.monotonic()
        self.records: list[Record] = []
        self.retries: Counter[int] = Counter()
        self.bugs: Counter[str] = Counter()
        self.workdir = Path(tempfile.mkdtemp(prefix="cc-soak-"))
        self.redis: harness.PrivateRedis | None = None
        self.postgres: harness.PrivatePostgres | None = None
        self.provider: harness.LoggedProcess | None = None
        self.server: harness.LoggedProcess | None = None
        self.clients: list[Client] = []
        self.monitor: HealthMonitor | None = None
        self.minutes: list[dict[str, Any]] = []
        self.flags: list[str] = []
        self.env: dict[str, str] = {}
        self.identity: dict[str, Any] = {}
        self.start_sample: dict[str, Any] = {"rss_mb": 0.0, "stats": None}

    # --- bookkeeping called from the client threads --------------------------------

    def record(
        self, endpoint: str, outcome: str, began: float, latency: float, first: float | None
    ) -> None:
        """Keep one request's result."""
        item = Record(self.minute, endpoint, outcome, began - self.t0, latency, first)
        with self._lock:
            self.records.append(item)

    def client_bug(self, text: str) -> None:
        """A client action failed in the soak's own code (flagged, counted once per kind)."""
        with self._lock:
            self.bugs[text] += 1
            first = self.bugs[text] == 1
        if first:
            say(f"client error (a bug of the soak, not of the server?): {text}")

    def count_retry(self) -> None:
        """A kept-alive connection was found closed and the request sent again."""
        with self._lock:
            self.retries[self.minute] += 1

    # --- the processes --------------------------------------------------------------

    def provider_control(self, mode: str) -> None:
        """Switch the fake provider's mode (POST /control)."""
        assert self.provider is not None
        harness.provider_call(self.provider.port, "POST", "/control", {"mode": mode})

    def provider_stats(self) -> dict[str, Any]:
        """The provider's counters ({} when it does not answer)."""
        assert self.provider is not None
        try:
            return harness.provider_call(self.provider.port, "GET", "/stats")
        except (OSError, http.client.HTTPException, ValueError, RuntimeError):
            return {}

    def server_stats(self, wait: float = 5.0) -> dict[str, int] | None:
        """SIGUSR1 and the `stats ...` line the server logs for it (None: no answer)."""
        assert self.server is not None
        path = self.server.log_path
        offset = path.stat().st_size
        try:
            os.kill(self.server.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with open(path, "rb") as log:
                log.seek(offset)
                match = STATS_RE.search(log.read().decode("utf-8", "replace"))
            if match:
                names = ("connections", "greenlets", "open_fds", "rss_kib")
                return dict(zip(names, map(int, match.groups()), strict=True))
            time.sleep(0.05)
        return None

    def start(self) -> None:
        """Provider, storage (a private Redis and PostgreSQL for setup postgres), server;
        the worker accounts. close() undoes whatever got done."""
        args = self.args
        server_path, self.identity = harness.snapshot(args.server, self.workdir)
        self.provider = harness.start_provider(self.workdir)
        say(f"fake provider on port {self.provider.port}")
        if args.setup == "postgres":
            self.redis = harness.PrivateRedis(self.workdir)
            self.postgres = harness.PrivatePostgres()
            self.postgres.start()
            say(
                f"private redis-server on port {self.redis.port}, private PostgreSQL"
                f" on port {self.postgres.port} ({self.postgres.dir})"
            )
            storage = {"DATABASE_URL": self.postgres.url(), "REDIS_URL": self.redis.url()}
            harness.run_initdb(server_path, storage)
        else:
            storage = harness.EmbeddedStorage(self.workdir, server_path).prepare(1)
        self.env = {
            **harness.server_env(storage, self.provider.port), "DEEPSEEK_API_KEY": "soak",
            "DEBUG_RETURN_RESET_TOKEN": "1", "RATE_FORGOT_IP": harness.RAISED_LIMIT,
            "RATE_FORGOT_IDENTIFIER": harness.RAISED_LIMIT, **args.env,
        }  # fmt: skip
        argv = [sys.executable, str(server_path)]
        self.server = harness.LoggedProcess(argv, self.env, self.workdir / "server.log")
        self.port = self.server.port
        say(f"server PID {self.server.pid} on port {self.port} ({args.setup})")
        emails = [f"soak-{self.tag}-w{i}@example.com" for i in range(args.workers)]
        for email in emails:
            harness.register_user(self.port, email)
        self.clients = [Worker(self, number, email) for number, email in enumerate(emails)]
        self.monitor = HealthMonitor(self)
        self.clients.append(self.monitor)

    def quiet_sample(self) -> dict[str, Any]:
        """Park every client, let the server settle; RSS, SIGUSR1 stats, upstream conns."""
        assert self.server is not None
        parked = self.gate.close(sum(1 for c in self.clients if c.thread.is_alive()), 15.0)
        time.sleep(1.0)  # the server closes the connections the clients closed
        rss = harness.settle(self.server.pid, 2.0)
        return {
            "all_parked": parked, "rss_mb": round(rss, 2), "stats": self.server_stats(),
            "upstream_open": self.provider_stats().get("open"),
        }  # fmt: skip

    def run(self) -> None:
        """The minutes: traffic, one fault each, a quiet point at the end of each."""
        try:
            self._run_minutes()
        finally:
            self.stop.set()
            self.gate.opened.set()
            for client in self.clients:
                if client.thread.is_alive():
                    client.thread.join(CLIENT_TIMEOUT * 3)

    def _run_minutes(self) -> None:
        assert self.server is not None
        args = self.args
        self.start_sample = self.quiet_sample()
        say(f"before traffic: {describe_quiet(self.start_sample)}")
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.minutes * MINUTE + 120  # slack for late quiet points
        self.minute = 1
        self.gate.opened.set()
        for client in self.clients:
            client.thread.start()
        planned = self.t0
        for minute in range(1, args.minutes + 1):
            start = max(planned, time.monotonic())
            planned = start + MINUTE
            self.minute = minute
            self.gate.opened.set()
            window: dict[str, Any] = {"name": args.faults[(minute - 1) % len(args.faults)]}
            with harness.RssSampler(self.server.pid) as rss:
                sleep_until(start + FAULT_AT)
                if window["name"] != "none":
                    self._fault(minute, start, window)
                sleep_until(start + QUIET_AT)
                quiet = self.quiet_sample()
            summary = self.summarize_minute(minute, window, quiet, rss.peak)
            self.minutes.append(summary)
            print(render_minute(summary, args.minutes), flush=True)
            if not self.server.alive():
                code = self.server.proc.returncode
                self.flags.append(f"the server exited (code {code}) in minute {minute}")
                break
            if minute < args.minutes:
                sleep_until(planned)

    def _fault(self, minute: int, start: float, window: dict[str, Any]) -> None:
        """Inject the minute's fault at FAULT_AT, heal it --fault-seconds later."""
        assert self.server is not None
        name, notes, seconds = window["name"], {}, self.args.fault_seconds
        inject, heal = FAULTS[name]
        window["injected_at"] = round(time.monotonic() - self.t0, 2)
        try:
            inject(self, notes)
            sleep_until(start + FAULT_AT + seconds / 2)
            window["under_fault"] = self.server_stats(2.0)
            sleep_until(start + FAULT_AT + seconds)
        except Exception as exc:
            self.flags.append(f"minute {minute}: injecting {name}: {exc!r}")
        finally:
            try:
                heal(self, notes)
            except Exception as exc:
                self.flags.append(f"minute {minute}: healing {name}: {exc!r}")
        window["healed_at"] = round(time.monotonic() - self.t0, 2)
        window["notes"] = notes
        say(f"minute {minute}: {name} injected and healed {notes}")

    # --- figures ---------------------------------------------------------------------

    def summarize_minute(
        self, minute: int, window: dict[str, Any], quiet: dict[str, Any], peak: float
    ) -> dict[str, Any]:
        """The minute's requests, errors, latencies and server figures."""
        with self._lock:
            records = [r for r in self.records if r.minute == minute]
        errors = [r for r in records if r.outcome != "ok"]
        faulty = "injected_at" in window
        outside = [
            r for r in errors
            if not faulty
            or not window["injected_at"] - CLIENT_TIMEOUT <= r.at <= window["healed_at"] + GRACE
        ]  # fmt: skip
        endpoints = {}
        for name in ENDPOINTS:
            if mine := [r for r in records if r.endpoint == name]:
                endpoints[name] = endpoint_summary(mine)
        probes = [s for s in (self.monitor.samples if self.monitor else []) if s[0] == minute]
        summary = {
            "minute": minute, "fault": window, "requests": len(records),
            "ok": len(records) - len(errors), "errors": len(errors),
            "errors_in_fault_window": len(errors) - len(outside),
            "errors_outside_fault_window": len(outside),
            "errors_by_kind": dict(Counter(r.outcome for r in errors).most_common()),
            "outside_by_kind": dict(Counter(f"{r.endpoint} {r.outcome}" for r in outside)),
            "outside_first_at": [round(r.at, 2) for r in outside[:10]],
            "status_500": sum(1 for r in records if status_of(r.outcome) == 500),
            "ended_session_accepted": sum(
                1 for r in records if r.outcome == "200 ended_session_accepted"
            ),
            "keepalive_retries": self.retries.get(minute, 0), "endpoints": endpoints,
            "quiet": quiet, "peak_rss_mb": round(peak, 2), "probe": probe_summary(probes, window),
        }  # fmt: skip
        if faulty:
            late = [r.at for r in errors if r.at >= window["healed_at"]]
            after = round(max(late) - window["healed_at"], 2) if late else None
            summary["last_error_after_heal_s"] = after
        return summary

    def verdict(self) -> dict[str, Any]:
        """Growth between the early and the late quiet points; everything else flagged."""
        quiets = {m["minute"]: m["quiet"] for m in self.minutes} | {0: self.start_sample}
        count = len(self.minutes)
        if count >= 5:
            base, end = [2, 3], [count - 1, count]
        elif count >= 3:
            base, end = [2], [count]
        else:
            base, end = {0: ([], []), 1: ([0], [1]), 2: ([1], [2])}[count]

        def values(which: list[int], key: str) -> list[float]:
            found = [quiets.get(number) or {} for number in which]
            found = [
                q.get(key) if key == "rss_mb" else (q.get("stats") or {}).get(key) for q in found
            ]
            return [v for v in found if v is not None]

        result: dict[str, Any] = {
            "baseline_minutes": base, "final_minutes": end, "indicative_only": count < 5,
            "thresholds": {
                "rss_growth_mb": RSS_LIMIT_MB, "rss_mb_per_minute": RSS_SLOPE_LIMIT,
                "greenlets": GREENLET_TOLERANCE, "open_fds": FD_TOLERANCE,
            },
        }  # fmt: skip
        flags = list(self.flags)
        for key, limit, label in GROWTH if base else ():
            before, after = values(base, key), values(end, key)
            if not before or not after:
                result[key] = None
                flags.append(f"{label}: no figure for minutes {base} or {end}")
                continue
            mean_or_max = statistics.mean if key == "rss_mb" else max
            first, last = mean_or_max(before), mean_or_max(after)
            grew = last - first > limit
            result[key] = {
                "baseline": round(first, 2), "final": round(last, 2),
                "growth": round(last - first, 2), "ok": not grew,
            }  # fmt: skip
            if grew and base != [0]:  # against the cold start, growth is the warm-up
                flags.append(f"{label} grew from {first:.1f} to {last:.1f} (limit +{limit})")
        # A step (a burst raised the allocator's high-water mark) is not a leak; a steady
        # climb is: the least-squares slope of the quiet-point RSS over the second half.
        half = [
            (m["minute"], m["quiet"]["rss_mb"])
            for m in self.minutes
            if m["minute"] > count // 2 and m["quiet"].get("rss_mb")
        ]
        if len(half) >= 3:
            slope = statistics.linear_regression(*zip(*half, strict=True)).slope
            span = [half[0][0], half[-1][0]]
            result["rss_slope"] = {
                "minutes": span,
                "mb_per_minute": round(slope, 3),
                "ok": slope <= RSS_SLOPE_LIMIT,
            }
            if slope > RSS_SLOPE_LIMIT:
                flags.append(
                    f"RSS climbs {slope:+.2f} MB a minute over minutes {span[0]}-{span[1]}"
                    f" (limit +{RSS_SLOPE_LIMIT})"
                )
        for m in self.minutes:
            quiet, upstream, at = (
                m["quiet"],
                m["quiet"].get("upstream_open"),
                f"minute {m['minute']}:",
            )
            if quiet.get("stats") is None:
                flags.append(f"{at} no answer to SIGUSR1 within 5 s (hung?)")
            if not quiet.get("all_parked"):
                flags.append(f"{at} a client did not finish its request in 15 s")
            if m["status_500"]:
                flags.append(f"{at} {m['status_500']} answers with status 500")
            if n := m["errors_outside_fault_window"]:
                flags.append(f"{at} {n} errors outside the fault window: {m['outside_by_kind']}")
            if n := m["ended_session_accepted"]:
                flags.append(f"{at} {n} ended sessions answered 200")
            if upstream is not None and upstream > UPSTREAM_IDLE:
                flags.append(f"{at} {upstream} upstream connections open at the quiet point")
                flags[-1] += f" (idle pool {UPSTREAM_IDLE})"
        for text, n in self.bugs.items():
            flags.append(f"client-side error in the soak itself ({n}x): {text}")
        result["flags"] = flags
        return result

    def finish(self) -> dict[str, Any]:
        """Stop the server (a clean exit is expected) and read its log."""
        assert self.server is not None and self.provider is not None
        began = time.monotonic()
        self.server.stop()
        facts: dict[str, Any] = {
            "exit_code": self.server.proc.returncode,
            "shutdown_s": round(time.monotonic() - began, 2),
        }
        try:
            text = self.server.log_text()
        except OSError as exc:
            text = ""
            self.flags.append(f"the server log could not be read: {exc}")
        facts.update(read_server_log(text))
        if facts["exit_code"] != 0:
            self.flags.append(f"the server exited with code {facts['exit_code']} on SIGTERM")
        if facts["tracebacks"]:
            self.flags.append(f"{facts['tracebacks']} tracebacks in the server log")
        if facts["status_500_lines"]:
            self.flags.append(f"{facts['status_500_lines']} requests logged with status 500")
        if keep := self.args.keep_logs:
            keep.mkdir(parents=True, exist_ok=True)
            for name, process in (
                ("server", self.server), ("provider", self.provider),
                ("redis", self.redis), ("postgres", self.postgres),
            ):  # fmt: skip
                if process is not None:
                    with contextlib.suppress(OSError):
                        shutil.copyfile(process.log_path, keep / f"{name}.log")
        return facts

    def close(self) -> None:
        """Stop whatever still runs, by PID; remove the temporary files."""
        self.stop.set()
        self.gate.opened.set()
        for stop in (
            self.server and self.server.stop, self.provider and self.provider.stop,
            self.redis and self.redis.stop, self.postgres and self.postgres.remove,
        ):  # fmt: skip
            if stop:
                with contextlib.suppress(Exception):
                    stop()  # a no-op for a process already stopped
        shutil.rmtree(self.workdir, ignore_errors=True)


def endpoint_summary(mine: list[Record]) -> dict[str, Any]:
    """Requests, outcomes and latencies of one endpoint over a minute."""
    latencies = [r.latency for r in mine]
    firsts = [r.first_line for r in mine if r.first_line is not None]
    result = {
        "requests": len(mine), "ok": sum(1 for r in mine if r.outcome == "ok"),
        "outcomes": dict(Counter(r.outcome for r in mine if r.outcome != "ok")),
        "p50_ms": ms(harness.percentile(latencies, 50)),
        "p99_ms": ms(harness.percentile(latencies, 99)), "max_ms": ms(max(latencies)),
    }  # fmt: skip
    if firsts:
        result["first_line_p50_ms"] = ms(harness.percentile(firsts, 50))
        result["first_line_p99_ms"] = ms(harness.percentile(firsts, 99))
    return result


def probe_summary(
    probes: list[tuple[int, float, str, float]], window: dict[str, Any]
) -> dict[str, Any]:
    """The 0.5 s health probe over one minute: latencies, and when the fault showed."""
    latencies = [p[3] for p in probes]
    result: dict[str, Any] = {
        "count": len(probes), "failures": sum(1 for p in probes if p[2] != "ok"),
        "max_ms": round(max(latencies), 1) if latencies else None,
        "p99_ms": round(harness.percentile(latencies, 99) or 0, 1) if latencies else None,
        "outcomes": dict(Counter(p[2] for p in probes if p[2] != "ok")),
    }  # fmt: skip
    if "injected_at" in window:
        injected, healed = window["injected_at"], window["healed_at"]
        bad = [p for p in probes if p[1] >= injected and p[2] != "ok"]
        result["failed_after_s"] = round(bad[0][1] - injected, 2) if bad else None
        if bad:
            good = [p for p in probes if p[1] >= healed and p[2] == "ok"]
            back = round(good[0][1] + good[0][3] / 1000 - healed, 2) if good else None
            result["ok_again_after_heal_s"] = back
    return result


def read_server_log(text: str) -> dict[str, Any]:
    """Tracebacks (with excerpts), ERROR lines, 5xx request lines, warnings by kind."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if TRACEBACK in line][:3]
    statuses = Counter(
        " ".join(match) for match in REQUEST_LINE_RE.findall(text) if match[2].startswith("5")
    )
    # Object addresses (pywsgi logs the socket's repr) blanked too, so like lines add up.
    complaints = harness.complaint_kinds(re.sub(r"0x[0-9a-f]+", "0x", text))
    return {
        "lines": len(lines), "tracebacks": text.count(TRACEBACK),
        "traceback_excerpts": ["\n".join(lines[max(0, i - 1) : i + 25]) for i in starts],
        "error_lines": len(re.findall(r" (?:ERROR|CRITICAL) ", text)),
        "status_500_lines": sum(n for key, n in statuses.items() if key.endswith(" 500")),
        "status_5xx_by_route": dict(statuses.most_common()),
        "complaints": dict(complaints.most_common(25)),
    }  # fmt: skip


# --- Output ------------------------------------------------------------------------------


def describe_quiet(quiet: dict[str, Any]) -> str:
    """The quiet-point figures in one phrase."""
    text = f"RSS {quiet['rss_mb']:.1f} MB"
    if stats := quiet.get("stats"):
        text += f", greenlets {stats['greenlets']}, open fds {stats['open_fds']}, connections"
        text += f" {stats['connections']}"
    else:
        text += ", no answer to SIGUSR1"
    if quiet.get("upstream_open") is not None:
        text += f", upstream connections open {quiet['upstream_open']}"
    return text


def kinds_text(kinds: dict[str, int], top: int = 99) -> str:
    """'kind n, kind n' for the most frequent kinds."""
    items = sorted(kinds.items(), key=lambda item: -item[1])
    return ", ".join(f"{kind} {count:,}" for kind, count in items[:top]) or "-"


def fmt(value: float | None, digits: int = 1) -> str:
    """A figure, '-' for none."""
    return "-" if value is None else f"{value:,.{digits}f}"


def render_minute(m: dict[str, Any], total: int) -> str:
    """The report printed at the end of every minute."""
    window, probe = m["fault"], m["probe"]
    if "injected_at" in window:
        head = (
            f"minute {m['minute']}/{total}: {window['name']} at {window['injected_at']:.1f} s,"
            f" healed at {window['healed_at']:.1f} s"
        )
        if window.get("notes"):
            head += " (" + ", ".join(f"{k} {v}" for k, v in window["notes"].items()) + ")"
        shown, back = probe.get("failed_after_s"), probe.get("ok_again_after_heal_s")
        shows = "200 throughout"
        if shown is not None:
            shows = f"failing {shown:.1f} s after the injection, 200 again {fmt(back)} s"
            shows += " after healing"
        last = "no client error after healing"
        if (after := m.get("last_error_after_heal_s")) is not None:
            last = f"last client error {after:.1f} s after healing"
        slowest = f"slowest probe {fmt(probe['max_ms'])} ms"
        out = [f"== {head}", f"   healthz probe: {shows}; {slowest}; {last}"]
    else:
        out = [f"== minute {m['minute']}/{total}: no fault"]
        out.append(f"   healthz probe: slowest {fmt(probe['max_ms'])} ms")
    out.append(
        f"   requests {m['requests']:,}: ok {m['ok']:,}, errors {m['errors']:,} (in the fault"
        f" window {m['errors_in_fault_window']:,}, outside {m['errors_outside_fault_window']:,}),"
        f" status 500: {m['status_500']}, keep-alive retries {m['keepalive_retries']}"
    )
    out.append(f"   errors by kind: {kinds_text(m['errors_by_kind'])}")
    rows = [("endpoint", "requests", "ok", "p50 ms", "p99 ms", "errors by kind")]
    for name, e in m["endpoints"].items():
        counts = f"{e['requests']:,}", f"{e['ok']:,}", fmt(e["p50_ms"]), fmt(e["p99_ms"])
        rows.append((name, *counts, kinds_text(e["outcomes"], 4)))
    out += ["     " + line for line in harness.text_table(rows, "lrrrr-", rule=False)]
    out.append(
        f"   server at the quiet point: {describe_quiet(m['quiet'])}; peak RSS this minute"
        f" {m['peak_rss_mb']:.1f} MB"
    )
    if under := window.get("under_fault"):
        out.append(
            f"   under the fault: connections {under['connections']}, greenlets"
            f" {under['greenlets']}, open fds {under['open_fds']}, RSS"
            f" {under['rss_kib'] / 1024:.1f} MB"
        )
    return "\n".join(out)


def render_table(soak: Soak) -> str:
    """One line per minute."""
    header = "min,fault,requests,errors,outside,500s,RSS MB,peak MB,greenlets,fds,back s"
    stats = soak.start_sample.get("stats") or {}
    rows = [
        (*header.split(","), "errors by kind"),
        ("0", "(before traffic)", "", "", "", "", fmt(soak.start_sample["rss_mb"]), "",
         str(stats.get("greenlets", "-")), str(stats.get("open_fds", "-")), "", ""),
    ]  # fmt: skip
    for m in soak.minutes:
        stats = m["quiet"].get("stats") or {}
        rows.append(
            (
                str(m["minute"]), m["fault"]["name"], f"{m['requests']:,}", f"{m['errors']:,}",
                f"{m['errors_outside_fault_window']:,}", str(m["status_500"]),
                fmt(m["quiet"]["rss_mb"]), fmt(m["peak_rss_mb"]),
                str(stats.get("greenlets", "-")), str(stats.get("open_fds", "-")),
                fmt(m["probe"].get("ok_again_after_heal_s")), kinds_text(m["errors_by_kind"], 3),
            )
        )  # fmt: skip
    return "\n".join(harness.text_table(rows, "rlrrrrrrrrr-"))


def render_verdict(verdict: dict[str, Any], log: dict[str, Any]) -> str:
    """Growth, flags, and the server log's findings."""
    base, end = verdict["baseline_minutes"], verdict["final_minutes"]
    out = ["growth: no whole minute to compare"]
    if base:
        named = "before traffic" if base == [0] else f"minute(s) {'-'.join(map(str, base))}"
        caveat = ""
        if base == [0]:
            caveat = " (a cold start: pools fill up, growth is shown, not flagged)"
        elif verdict["indicative_only"]:
            caveat = " (indicative only: fewer than 5 minutes)"
        finals = "-".join(map(str, end))
        out = [f"growth, quiet points of {named} against minute(s) {finals}{caveat}:"]
    for key, limit, label in GROWTH if base else ():
        if (found := verdict.get(key)) is None:
            out.append(f"  {label:<10} no figures")
            continue
        out.append(
            f"  {label:<10} {found['baseline']:8.1f} -> {found['final']:8.1f}"
            f"  {found['growth']:+6.1f} (limit +{limit})"
            f"  {'ok' if found['ok'] else ('warm-up' if base == [0] else 'GROWTH')}"
        )
    if slope := verdict.get("rss_slope"):
        first, last = slope["minutes"]
        out.append(
            f"  RSS trend over minutes {first}-{last}: {slope['mb_per_minute']:+.3f} MB a minute"
            f" (limit +{RSS_SLOPE_LIMIT})  {'ok' if slope['ok'] else 'CLIMBING'}"
        )
    out.append(
        f"server log: {log['lines']:,} lines, {log['tracebacks']} tracebacks,"
        f" {log['error_lines']} ERROR lines, {log['status_500_lines']} requests with status"
        f" 500; exit code {log['exit_code']} after SIGTERM ({log['shutdown_s']:.1f} s)"
    )
    if log["status_5xx_by_route"]:
        out.append(f"  5xx by route: {kinds_text(log['status_5xx_by_route'], 8)}")
    if log["complaints"]:
        out.append("  warnings and errors by kind:")
        out += [f"    {n:6,}  {kind[:150]}" for kind, n in list(log["complaints"].items())[:12]]
    for excerpt in log["traceback_excerpts"]:
        out.append("  traceback:\n" + "\n".join("    " + line for line in excerpt.splitlines()))
    if flags := verdict["flags"]:
        out.append(f"verdict: FLAGGED ({len(flags)})")
        out.extend(f"  - {flag}" for flag in flags)
    else:
        out.append("verdict: ok (no 500, no traceback, no error outside the fault windows,")
        out.append("         no growth past the thresholds)")
    return "\n".join(out)


# --- main() ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add = parser.add_argument
    add("--minutes", type=int, default=10, help="minutes of traffic (1..120)")
    add("--setup", choices=("postgres", "embedded"), default="postgres")
    add("--json", type=Path, help="where to write every figure")
    add("--workers", type=int, default=12, help="client threads (1..64)")
    add(
        "--faults", default="",
        help=f"comma-separated rotation, one a minute, from {', '.join(FAULTS)}\n"
        f"(default postgres: {','.join(ROTATION['postgres'])};\n"
        f" embedded: {','.join(ROTATION['embedded'])})",
    )  # fmt: skip
    add("--fault-seconds", type=float, default=12.0, help="how long each fault lasts (1..30)")
    add("--seed", type=int, default=1, help="seed of the workers' choices")
    add(
        "--env", action="append", default=[], metavar="NAME=VALUE",
        help="an extra setting for the server (repeatable)",
    )  # fmt: skip
    add("--keep-logs", type=Path, help="copy the logs to this folder")
    add(
        "--server", type=Path, default=harness.ROOT / "cloudchat.py",
        help="the server module to run (schema.sql beside it)",
    )  # fmt: skip
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
    args.faults, args.env = faults, harness.parse_env(parser, args.env)
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Start everything, run the minutes, report, clean up."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = dt.datetime.now(dt.UTC)
    soak, box = Soak(args), harness.machine()
    print(
        f"CloudChat soak, setup {args.setup}, {args.minutes} minute(s), {args.workers} workers,"
        f" faults {','.join(args.faults)} ({args.fault_seconds:g} s at {FAULT_AT:g} s into each"
        f" minute); {box['nproc']} x {box['cpu_model']}, Python {box['python']}, load average"
        f" at start {box['loadavg_at_start'][0]:.2f}; MB = MiB",
        flush=True,
    )
    log_facts: dict[str, Any] = {}
    try:
        soak.start()
        print(harness.identity_line(soak.identity), flush=True)
        try:
            soak.run()
        except KeyboardInterrupt:
            soak.flags.append("interrupted: the figures stop at the last whole minute")
            say("interrupted: stopping and cleaning up")
        log_facts = soak.finish()
    finally:
        soak.close()
    verdict = soak.verdict()
    print(f"\n{render_table(soak)}\n\n{render_verdict(verdict, log_facts)}")
    out = args.json or harness.BENCH / "results" / f"soak-{args.setup}-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "setup": args.setup,
        "minutes": args.minutes, "workers": args.workers, "faults": args.faults,
        "fault_seconds": args.fault_seconds, "fault_at_s": FAULT_AT, "quiet_at_s": QUIET_AT,
        "client_timeout_s": CLIENT_TIMEOUT, "grace_s": GRACE, "weights": WEIGHTS,
        "seed": args.seed,
        "server_settings": {k: v for k, v in soak.env.items() if k not in ("PATH", "LANG")},
        "server": soak.identity, "machine": box, "started": started.isoformat(timespec="seconds"),
    }  # fmt: skip
    samples = soak.monitor.samples if soak.monitor else []
    probes = [[m, round(a, 2), o, round(t, 1)] for m, a, o, t in samples]
    record = {
        "meta": meta, "before_traffic": soak.start_sample, "minutes": soak.minutes,
        "verdict": verdict, "server_log": log_facts, "probe_samples": probes,
    }  # fmt: skip
    out.write_text(json.dumps(record, indent=1))
    print(f"figures written to {out}")
    return 1 if verdict["flags"] else 0


if __name__ == "__main__":
    sys.exit(main())
