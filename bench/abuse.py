"""Issue 12's attack figures, for one server file: run it on the old and the new one.

    .venv/bin/python bench/abuse.py [--server PATH/cloudchat.py] [--only flood,lockout,ipv6,race]

Each scenario starts `python PATH/cloudchat.py` on SQLite (a temporary file) and, where it
needs Redis, a private redis-server on a free loopback port; both are stopped by their PID.

    flood    a private Redis of 4 MB (the policy of deploy/redis/cloudchat.conf, or
             --policy): a victim's login limit is used up (3 wrong passwords), then 180
             chats of 16 KB from 180 addresses; evicted keys, used memory, the chats'
             statuses and the victim's right password afterwards
    lockout  production Argon2: 10 wrong passwords for the victim, each from another
             address; then the right password from a new browser and from the victim's
             own (it signed in before), and how long a refused and a real check take
    ipv6     12 registrations from 12 addresses of one IPv6 /64 (limit 10 per address)
    race     20 trials on PostgreSQL (a throwaway database on 127.0.0.1:5432): /auth/me
             filling the session cache while a logout lands, then /auth/me at once (Redis
             cache of 60 s): how often the session survived its logout
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import harness  # bench/ is sys.path[0] when this file runs as a script

SCENARIOS = ("flood", "lockout", "ipv6", "race")
REDIS_CONF = harness.ROOT / "deploy" / "redis" / "cloudchat.conf"
PASSWORD = "Bench-abuse-pw-7"


class Client:
    """One browser: a cookie jar and a client address (X-Forwarded-For from loopback)."""

    def __init__(self, port: int, address: str = "127.0.0.1") -> None:
        self.port, self.address, self.cookies = port, address, {}

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, float]:
        """One request; (status, seconds)."""
        headers = {"X-Forwarded-For": self.address}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        started = time.perf_counter()
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None, headers)
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, value = header.split(";", 1)[0].partition("=")
            if value and "Max-Age=0" not in header:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        return response.status, time.perf_counter() - started

    def login(self, email: str, password: str) -> tuple[int, float]:
        """POST /auth/login."""
        return self.call("POST", "/auth/login", {"identifier": email, "password": password})


def private_redis(workdir: Path, maxmemory: str, policy: str) -> tuple[Any, Any]:
    """A redis-server of our own (harness.PrivateRedis) and a client of it."""
    import redis

    server = harness.PrivateRedis(workdir, "--maxmemory", maxmemory, "--maxmemory-policy", policy)
    return server, redis.Redis(port=server.port, socket_timeout=5)


def start_server(server: Path, workdir: Path, **env: str) -> harness.LoggedProcess:
    """The server under test on SQLite in workdir, with these settings."""
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOST": "127.0.0.1",
        "PORT": "0",
        "PYTHONUNBUFFERED": "1",
        "CLOUDCHAT_DB_PATH": str(workdir / f"{secrets.token_hex(4)}.db"),
        "RATE_REGISTER_IP": "1000000/3600",
        "RATE_REGISTER_EMAIL": "1000000/3600",
        "RATE_VISITOR_IDS_IP": "1000000/3600",
    }
    log = workdir / f"server-{secrets.token_hex(4)}.log"
    return harness.LoggedProcess([sys.executable, str(server)], {**base, **env}, log, cwd=workdir)


def register(port: int) -> str:
    """A fresh account; its email."""
    email = f"victim-{secrets.token_hex(4)}@example.com"
    status, _ = Client(port).call("POST", "/auth/register", {"email": email, "password": PASSWORD})
    assert status == 201, status
    return email


def flood(server: Path, workdir: Path, policy: str) -> dict[str, Any]:
    """A chat flood against a small Redis, then the victim's exhausted login limit."""
    redis, store = private_redis(workdir, "4mb", policy)
    cheap = {"ARGON2_TIME_COST": "1", "ARGON2_MEMORY_KIB": "8"}
    app = start_server(
        server, workdir, REDIS_URL=redis.url(), RATE_LOGIN_IDENTIFIER="3/600",
        RATE_CHAT_IP="1000000/60", RATE_CHAT_VISITOR="1000000/60",
        CHAT_MAX_CHARS="16000", CHAT_HISTORY_BUDGET_MB="1", **cheap,
    )  # fmt: skip
    try:
        email = register(app.port)
        for n in range(4):
            Client(app.port, f"198.18.1.{n + 1}").login(email, "wrong-" + PASSWORD)
        statuses: Counter[int] = Counter()
        for n in range(180):
            client = Client(app.port, f"198.19.{n // 250}.{n % 250 + 1}")
            statuses[client.call("POST", "/deepseek_chat", {"message": "x" * 16000})[0]] += 1
        info = store.info()
        victim = Client(app.port, "198.18.2.1").login(email, PASSWORD)[0]
        return {
            "policy": policy,
            "chats": dict(statuses),
            "evicted_keys": info["evicted_keys"],
            "used_memory_kib": info["used_memory"] // 1024,
            "victim_right_password": victim,
        }
    finally:
        app.stop()
        store.close()
        redis.stop()


def lockout(server: Path, workdir: Path) -> dict[str, Any]:
    """Ten failures from ten addresses, then the right password: who gets in, how fast."""
    app = start_server(server, workdir, RATE_LOGIN_IP="1000000/600")
    try:
        email = register(app.port)
        own = Client(app.port, "198.18.3.1")
        assert own.login(email, PASSWORD)[0] == 200
        real = [Client(app.port, f"198.18.4.{n + 1}").login(email, "wrong")[1] for n in range(10)]
        stranger = [Client(app.port, f"198.18.5.{n + 1}").login(email, PASSWORD) for n in range(5)]
        return {
            "new_browser_right_password": sorted({status for status, _ in stranger}),
            "own_browser_right_password": own.login(email, PASSWORD)[0],
            "real_check_ms_median": round(statistics.median(real) * 1000, 1),
            "refused_by_limit_ms_median": round(
                statistics.median(seconds for _, seconds in stranger) * 1000, 1
            ),
        }
    finally:
        app.stop()


def ipv6(server: Path, workdir: Path) -> dict[str, Any]:
    """Registrations from one IPv6 /64, ten allowed per address."""
    app = start_server(
        server, workdir, RATE_REGISTER_IP="10/3600", ARGON2_TIME_COST="1", ARGON2_MEMORY_KIB="8"
    )
    try:
        statuses = [
            Client(app.port, f"2001:db8:1:2::{n + 1:x}").call(
                "POST",
                "/auth/register",
                {"email": f"v6-{secrets.token_hex(4)}@example.com", "password": PASSWORD},
            )[0]
            for n in range(12)
        ]
        return {"statuses": dict(Counter(statuses))}
    finally:
        app.stop()


def throwaway_database(server: Path) -> tuple[str, Any]:
    """A new PostgreSQL database on 127.0.0.1:5432 with the server's schema; (URL, drop)."""
    name = f"cc_abuse_{secrets.token_hex(4)}"
    harness.admin_sql(f'CREATE DATABASE "{name}"')
    url = harness.PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    harness.run_initdb(server, {"DATABASE_URL": url})
    return url, lambda: harness.admin_sql(f'DROP DATABASE "{name}" WITH (FORCE)')


def race(server: Path, workdir: Path, trials: int = 20) -> dict[str, Any]:
    """Logout against concurrent cache fills: how often a session outlives its logout."""
    redis, store = private_redis(workdir, "64mb", "noeviction")
    url, drop = throwaway_database(server)
    app = start_server(
        server, workdir, REDIS_URL=redis.url(), DATABASE_URL=url,
        SESSION_CACHE_SECONDS="60", RATE_LOGIN_IP="1000000/600",
        RATE_LOGIN_IDENTIFIER="1000000/600", ARGON2_TIME_COST="1", ARGON2_MEMORY_KIB="8",
    )  # fmt: skip
    survived = 0
    try:
        email = register(app.port)
        for _ in range(trials):
            browser = Client(app.port)
            assert browser.login(email, PASSWORD)[0] == 200
            cookie = dict(browser.cookies)
            for key in store.scan_iter(match="cc:sess:*"):
                store.delete(key)  # as if the entry had expired: the next read fills
            threads = []
            for _ in range(8):
                reader = Client(app.port)
                reader.cookies = dict(cookie)
                threads.append(threading.Thread(target=reader.call, args=("GET", "/auth/me")))
            for thread in threads:
                thread.start()
            browser.call("POST", "/auth/logout", {})
            for thread in threads:
                thread.join(30)
            replay = Client(app.port)
            replay.cookies = cookie
            survived += replay.call("GET", "/auth/me")[0] == 200
        return {"trials": trials, "session_alive_after_logout": survived}
    finally:
        app.stop()
        store.close()
        redis.stop()
        drop()


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios and print one JSON object per scenario."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--server", type=Path, default=harness.ROOT / "cloudchat.py")
    parser.add_argument("--only", default=",".join(SCENARIOS))
    default_policy = re.search(r"^maxmemory-policy (\S+)", REDIS_CONF.read_text(), re.M)
    parser.add_argument("--policy", default=default_policy.group(1) if default_policy else "")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cc-abuse-") as tmp:
        workdir = Path(tmp)
        for name in args.only.split(","):
            if name == "flood":
                result = flood(args.server.resolve(), workdir, args.policy)
            else:
                result = globals()[name](args.server.resolve(), workdir)
            print(json.dumps({"scenario": name, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
