"""Resident memory of the server after start and after N requests, beside the import floor.

    .venv/bin/python bench/rss.py                  # embedded setup (SQLite + in-process store)
    DATABASE_URL=postgresql://postgres@127.0.0.1/cc_bench REDIS_URL=redis://127.0.0.1/15 \\
        .venv/bin/python bench/rss.py              # PostgreSQL + Redis (run initdb first)

The floor is `python -c "import gevent, bottle, psycopg2, redis, argon2"`, measured the same
way (VmRSS from /proc once the process idles). Figures are printed, never asserted.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "1000"))


def rss_mib(pid: int) -> float:
    """VmRSS of a process in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) / 1024


def settle(pid: int) -> float:
    """RSS once it stops changing (or after 3 s)."""
    deadline = time.monotonic() + 3
    last = rss_mib(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rss_mib(pid)
        if abs(now - last) < 0.05:
            return now
        last = now
    return last


def import_floor() -> float:
    """RSS of a Python that imported the five runtime packages and waits."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import gevent, bottle, psycopg2, redis, argon2, sys; print('ready', flush=True);"
            " sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    try:
        return settle(proc.pid)
    finally:
        proc.communicate("")


def main() -> None:
    """Start the server, measure, drive REQUESTS requests, measure again."""
    workdir = tempfile.mkdtemp(prefix="cc-bench-")
    env = {
        **os.environ,
        "PORT": "0",
        "CLOUDCHAT_DB_PATH": os.path.join(workdir, "bench.db"),
        "RATE_LOGIN_IP": "100000/600",
        "RATE_REGISTER_IP": "100000/3600",
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cloudchat.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    port = 0
    for line in proc.stdout:
        match = re.search(r"listening on http://[^:]+:(\d+)", line)
        if match:
            port = int(match.group(1))
            break
    # Keep reading the log: a full pipe would block the server on its next log line.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    try:
        start = settle(proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        email, password = f"bench-{secrets.token_hex(6)}@example.com", "bench-pass-1"
        headers = {"Content-Type": "application/json"}
        for path, body in (
            ("/auth/register", {"email": email, "password": password}),
            ("/auth/login", {"identifier": email, "password": password}),
        ):
            conn.request("POST", path, json.dumps(body), headers)
            answer = conn.getresponse()
            answer.read()
            cookie = answer.getheader("Set-Cookie", "")
        session = cookie.split(";", 1)[0]
        for _ in range(REQUESTS):
            conn.request("GET", "/auth/me", headers={"Cookie": session})
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200, answer.status
        after = settle(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    floor = import_floor()
    setup = "postgres+redis" if os.environ.get("DATABASE_URL") else "embedded"
    print(
        f"setup {setup}: import floor {floor:.1f} MiB; server after start {start:.1f} MiB;"
        f" after {REQUESTS} GET /auth/me {after:.1f} MiB ({after / floor:.2f} x floor)"
    )


if __name__ == "__main__":
    main()
