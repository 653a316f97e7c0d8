"""Issue 12's attack figures, for one server file: run it on the old and the new one.

    .venv/bin/python bench/abuse.py [--server PATH/cloudchat.py] [--only flood,lockout,ipv6,race]

bench/README.md says what each scenario does. Each starts the server (harness.start_server)
on a SQLite file or a private PostgreSQL, with a private redis-server where it needs one
(harness.Storage), all stopped by their PID; the browsers are the tests' cookie-keeping
client (tests/helpers.py), each at an address of its own (X-Forwarded-For from loopback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import secrets
import statistics
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness as h  # bench/ is sys.path[0] when this file runs as a script
import redis

sys.path.insert(0, str(h.ROOT))
from tests.helpers import CHEAP_ARGON2, Client

SCENARIOS = ("flood", "lockout", "ipv6", "race")
REDIS_CONF = h.ROOT / "deploy" / "redis" / "cloudchat.conf"
PASSWORD = "Bench-abuse-pw-7"
RAISED = "1000000/3600"


class App:
    """The server under test: its port, and a client of its private Redis (if any)."""

    def __init__(self, port: int, store: Any) -> None:
        self.port, self.store = port, store

    def browser(self, address: str = "127.0.0.1") -> Client:
        """A new browser at `address`."""
        return Client("127.0.0.1", self.port, {"X-Forwarded-For": address})

    def register(self) -> str:
        """A fresh account; its email."""
        email = f"victim-{secrets.token_hex(4)}@example.com"
        assert self.browser().register(email, PASSWORD).status == 201
        return email


@contextlib.contextmanager
def app(
    code: h.Code, workdir: Path, redis_options: tuple[str, ...] | None = None,
    postgres: bool = False, **env: str,
) -> Iterator[App]:  # fmt: skip
    """The server with these settings (and a private Redis with these options), stopped after."""
    storage = h.Storage(workdir, code, postgres, redis_options)
    store = redis.Redis(port=storage.redis.port, socket_timeout=5) if storage.redis else None
    try:
        limits = {"RATE_REGISTER_IP": RAISED, "RATE_REGISTER_EMAIL": RAISED}
        limits["RATE_VISITOR_IDS_IP"] = RAISED
        env = h.server_env(storage.env, raise_limits=False) | limits | env
        server = h.start_server(code, env, workdir / f"server-{secrets.token_hex(4)}.log")
        try:
            yield App(server.port, store)
        finally:
            server.stop()
    finally:
        if store is not None:
            store.close()
        storage.close()


def flood(code: h.Code, workdir: Path, policy: str) -> dict[str, Any]:
    """A chat flood against a small Redis, then the victim's exhausted login limit."""
    with app(
        code, workdir, ("--maxmemory", "4mb", "--maxmemory-policy", policy),
        RATE_LOGIN_IDENTIFIER="3/600", RATE_CHAT_IP="1000000/60", RATE_CHAT_VISITOR="1000000/60",
        CHAT_MAX_CHARS="16000", CHAT_HISTORY_BUDGET_MB="1", **CHEAP_ARGON2,
    ) as server:  # fmt: skip
        email = server.register()
        for n in range(4):
            server.browser(f"198.18.1.{n + 1}").login(email, "wrong-" + PASSWORD)
        chats = Counter(
            server.browser(f"198.19.{n // 250}.{n % 250 + 1}")
            .post("/deepseek_chat", {"message": "x" * 16000})
            .status
            for n in range(180)
        )
        info = server.store.info()
        victim = server.browser("198.18.2.1").login(email, PASSWORD).status
        return {
            "policy": policy, "chats": dict(chats), "evicted_keys": info["evicted_keys"],
            "used_memory_kib": info["used_memory"] // 1024, "victim_right_password": victim,
        }  # fmt: skip


def lockout(code: h.Code, workdir: Path) -> dict[str, Any]:
    """Ten failures from ten addresses, then the right password: who gets in, how fast."""
    with app(code, workdir, RATE_LOGIN_IP="1000000/600") as server:
        email = server.register()
        own = server.browser("198.18.3.1")
        assert own.login(email, PASSWORD).status == 200
        real = [server.browser(f"198.18.4.{n + 1}").login(email, "wrong") for n in range(10)]
        stranger = [server.browser(f"198.18.5.{n + 1}").login(email, PASSWORD) for n in range(5)]
        return {
            "new_browser_right_password": sorted({r.status for r in stranger}),
            "own_browser_right_password": own.login(email, PASSWORD).status,
            "real_check_ms_median": round(statistics.median(r.elapsed for r in real) * 1000, 1),
            "refused_by_limit_ms_median": round(
                statistics.median(r.elapsed for r in stranger) * 1000, 1
            ),
        }


def ipv6(code: h.Code, workdir: Path) -> dict[str, Any]:
    """Registrations from one IPv6 /64, ten allowed per address."""
    with app(code, workdir, RATE_REGISTER_IP="10/3600", **CHEAP_ARGON2) as server:
        statuses = Counter(
            server.browser(f"2001:db8:1:2::{n + 1:x}")
            .register(f"v6-{secrets.token_hex(4)}@example.com", PASSWORD)
            .status
            for n in range(12)
        )
        return {"statuses": dict(statuses)}


def race(code: h.Code, workdir: Path, trials: int = 20) -> dict[str, Any]:
    """Logout against concurrent cache fills: how often a session outlives its logout."""
    with app(
        code, workdir, ("--maxmemory", "64mb", "--maxmemory-policy", "noeviction"), postgres=True,
        SESSION_CACHE_SECONDS="60", RATE_LOGIN_IP="1000000/600",
        RATE_LOGIN_IDENTIFIER="1000000/600", **CHEAP_ARGON2,
    ) as server:  # fmt: skip
        email, survived = server.register(), 0
        for _ in range(trials):
            user = server.browser()
            assert user.login(email, PASSWORD).status == 200
            for key in server.store.scan_iter(match="cc:sess:*"):
                server.store.delete(key)  # as if the entry had expired: the next read fills
            readers = [server.browser() for _ in range(8)]
            threads = [threading.Thread(target=reader.me) for reader in readers]
            for reader, thread in zip(readers, threads, strict=True):
                reader.cookies = dict(user.cookies)
                thread.start()
            replay = server.browser()
            replay.cookies = dict(user.cookies)
            user.post("/auth/logout", {})
            for thread in threads:
                thread.join(30)
            survived += replay.me().status == 200
        return {"trials": trials, "session_alive_after_logout": survived}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios and print one JSON object per scenario."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--server", type=Path, default=h.ROOT / "cloudchat.py")
    parser.add_argument("--only", default=",".join(SCENARIOS))
    default_policy = re.search(r"^maxmemory-policy (\S+)", REDIS_CONF.read_text(), re.M)
    parser.add_argument("--policy", default=default_policy.group(1) if default_policy else "")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cc-abuse-", ignore_cleanup_errors=True) as tmp:
        code = h.snapshot(args.server.resolve(), Path(tmp))
        for name in args.only.split(","):
            if name == "flood":
                result = flood(code, Path(tmp), args.policy)
            else:
                result = {"lockout": lockout, "ipv6": ipv6, "race": race}[name](code, Path(tmp))
            print(json.dumps({"scenario": name, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
