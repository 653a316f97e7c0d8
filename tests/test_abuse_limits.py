"""Issue 12: limits that hold under abuse (a chat flood against Redis memory, account
lockout, IPv6 prefixes, the Argon2 queue), plus in-process tests of the pieces behind them."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import cloudchat
from tests.conftest import SETUPS, RedisDb, ServerFactory, unavailable
from tests.helpers import (
    INVALID_CREDENTIALS,
    ROOT,
    Client,
    Response,
    Server,
    assert_error,
    free_port,
    random_email,
    random_hex,
    random_phone,
    strong_password,
    wait_until,
)

HIGH = "100000/3600"
HIGH_LOGIN = "100000/600"
MIB = 1024 * 1024
REDIS_CONF = ROOT / "deploy" / "redis" / "cloudchat.conf"
_addresses = itertools.count(1)


def new_ip() -> str:
    """An address from 198.18.0.0/15 (benchmarking, never contacted) not used before here."""
    n = next(_addresses)
    return f"198.18.{n // 250}.{n % 250 + 1}"


def shipped_redis_policy() -> str:
    """The maxmemory-policy deploy/redis/cloudchat.conf sets (its last occurrence wins)."""
    text = REDIS_CONF.read_text(encoding="utf-8")
    policies = re.findall(r"(?m)^\s*maxmemory-policy\s+(\S+)", text)
    assert policies, f"no maxmemory-policy in {REDIS_CONF}"
    return policies[-1]


# The shipped policy, and the old one: the history budget alone must keep Redis from filling.
FLOOD_POLICIES = sorted({shipped_redis_policy(), "allkeys-lru"})


def assert_uniform_401(response: Response) -> None:
    """Assert the uniform login failure, with no session cookie."""
    assert response.status == 401, response
    assert response.json() == INVALID_CREDENTIALS
    assert response.cookie("cc_auth") is None


def register(server: Server, **extra: Any) -> tuple[str, str]:
    """Register a fresh account from a fresh client address; (email, password)."""
    email, password = random_email(), strong_password()
    response = server.client({"X-Forwarded-For": new_ip()}).register(email, password, **extra)
    assert response.status == 201, response
    return email, password


def stranger(server: Server) -> Client:
    """A browser that never signed in, at an address not used before."""
    return server.client({"X-Forwarded-For": new_ip()})


def fail_logins(server: Server, identifiers: list[str], password: str) -> None:
    """One wrong password per identifier, each from a fresh browser and address."""
    for identifier in identifiers:
        assert_uniform_401(stranger(server).login(identifier, "wrong-" + password))


def signed_in_browser(server: Server, email: str, password: str) -> Client:
    """A browser that signed in to the account (and so holds its cc_device), then logged out."""
    browser = stranger(server)
    assert browser.login(email, password).status == 200
    assert "cc_device" in browser.cookies, browser.cookies
    assert browser.post("/auth/logout").status == 200
    assert "cc_auth" not in browser.cookies and "cc_device" in browser.cookies
    return browser


# -- a private Redis --------------------------------------------------------------------------


@dataclass
class PrivateRedis:
    """A redis-server process of this test's own, on a loopback port."""

    proc: subprocess.Popen[bytes]
    port: int
    maxmemory: int
    policy: str
    log: Path
    client: Any = field(default=None)

    @property
    def url(self) -> str:
        """The URL a cloudchat server connects to."""
        return f"redis://127.0.0.1:{self.port}/0"

    def info(self, section: str) -> dict[str, Any]:
        """One section of INFO."""
        return dict(self.client.info(section))

    def stop(self) -> None:
        """SIGTERM the process by its PID (SIGKILL after a deadline) and close the client."""
        if self.client is not None:
            self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class RedisServers:
    """Starts private redis-server processes and stops each one by its PID at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        """Remember where the processes keep their logs."""
        self.tmp_path = tmp_path
        self.started: list[PrivateRedis] = []

    def start(self, policy: str, maxmemory: int) -> PrivateRedis:
        """Start one with no persistence, the given memory cap and policy; wait for PONG."""
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed; the private-Redis test cannot run")
        import redis

        port = free_port()
        log = self.tmp_path / f"redis-{port}.log"
        args = [
            str(binary),
            "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--save", "", "--appendonly", "no", "--dir", str(self.tmp_path),
            "--maxmemory", str(maxmemory), "--maxmemory-policy", policy,
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        private = PrivateRedis(proc, port, maxmemory, policy, log)
        self.started.append(private)
        private.client = redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=3, socket_connect_timeout=1
        )

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"redis-server exited:\n{log.read_text(errors='replace')}")
            try:
                return bool(private.client.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers, timeout=10, what="the private redis-server to answer PING")
        return private

    def stop_all(self) -> None:
        """Stop every process started here."""
        for private in self.started:
            private.stop()
        self.started.clear()


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[RedisServers]:
    """A factory of private redis-server processes, each stopped by PID after the test."""
    servers = RedisServers(tmp_path)
    try:
        yield servers
    finally:
        servers.stop_all()


# -- point 1: a chat flood cannot erase rate-limit counters -----------------------------------


@pytest.mark.parametrize("policy", FLOOD_POLICIES)
def test_chat_flood_cannot_erase_login_counters(
    make_server: ServerFactory, redis_servers: RedisServers, policy: str
) -> None:
    """Issue 12 point 1: 200 chats of 16 KB from fresh visitors evict nothing in a 4 MB Redis."""
    private = redis_servers.start(policy, maxmemory=4 * MIB)
    srv = make_server.start(
        "postgres",
        {
            "REDIS_URL": private.url,
            "CHAT_HISTORY_BUDGET_MB": "1",
            "CHAT_MAX_CHARS": "16000",
            "RATE_LOGIN_IDENTIFIER": "3/600",
            "RATE_LOGIN_IP": HIGH_LOGIN,
            "RATE_REGISTER_IP": HIGH,
            "RATE_CHAT_IP": "100000/60",
            "RATE_CHAT_VISITOR": "100000/60",
            "RATE_VISITOR_IDS_IP": HIGH,
        },
    )
    email, password = register(srv)
    fail_logins(srv, [email] * 3, password)
    assert_uniform_401(stranger(srv).login(email, password))  # the limit is in force

    def chat(_: int) -> Response:
        """One 16,000-character message from a fresh visitor at a fresh address."""
        return stranger(srv).post("/deepseek_chat", {"message": random_hex(8000)}, timeout=30)

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(chat, range(200)))
    statuses = [answer.status for answer in answers]
    assert statuses == [200] * len(answers), sorted(set(statuses))
    assert all(answer.body.endswith(b'{"done":true}\n') for answer in answers)
    assert all(len(answer.body) > 16000 for answer in answers)  # the echo, as long as asked

    assert_uniform_401(stranger(srv).login(email, password))
    assert private.info("stats")["evicted_keys"] == 0
    assert private.info("memory")["used_memory"] < private.maxmemory
    # What the histories hold stays near CHAT_HISTORY_BUDGET_MB (allocator rounding aside).
    histories = private.client.keys(srv.env["REDIS_KEY_PREFIX"] + "chat:*")
    held = sum(private.client.memory_usage(key, samples=0) or 0 for key in histories)
    assert 0 < held < 1.25 * MIB, held
    wait_until(
        lambda: "chat history budget reached" in srv.log_text(),
        timeout=5,
        what="the 'chat history budget reached' log line",
    )


# -- point 2: nobody can lock an account out --------------------------------------------------


@pytest.mark.parametrize("setup", SETUPS)
def test_lockout_spares_a_browser_that_signed_in_before(
    make_server: ServerFactory, setup: str
) -> None:
    """Issue 12 point 2: after 10 failures from 10 addresses only the known browser gets in."""
    srv = make_server.start(setup, {"RATE_LOGIN_IDENTIFIER": "10/600", "RATE_LOGIN_IP": HIGH_LOGIN})
    email, password = register(srv)
    device = signed_in_browser(srv, email, password)
    fail_logins(srv, [email] * 10, password)
    assert_uniform_401(stranger(srv).login(email, password))
    assert_uniform_401(stranger(srv).login(email.upper(), password))
    assert device.login(email, password).status == 200
    assert device.me().json()["user"]["email"] == email


@pytest.mark.parametrize("setup", SETUPS)
def test_email_and_phone_count_against_one_account_limit(
    make_server: ServerFactory, setup: str
) -> None:
    """Issue 12 point 2: 2 failures by email + 2 by phone use up one limit of 4 per account."""
    srv = make_server.start(setup, {"RATE_LOGIN_IDENTIFIER": "4/600", "RATE_LOGIN_IP": HIGH_LOGIN})
    digits, formatted = random_phone()
    email, password = register(srv, phone=formatted)
    fail_logins(srv, [email, email.upper(), formatted, f"+{digits}"], password)
    assert_uniform_401(stranger(srv).login(email, password))
    assert_uniform_401(stranger(srv).login(f"+{digits}", password))
    # Another account is untouched.
    other_email, other_password = register(srv)
    assert stranger(srv).login(other_email, other_password).status == 200


@pytest.mark.parametrize("setup", SETUPS)
def test_device_cookie_of_another_account_or_forged_does_not_help(
    make_server: ServerFactory, setup: str
) -> None:
    """Issue 12 point 2: only a genuine cc_device of that very account passes its limit."""
    srv = make_server.start(setup, {"RATE_LOGIN_IDENTIFIER": "5/600", "RATE_LOGIN_IP": HIGH_LOGIN})
    email_a, password_a = register(srv)
    email_b, password_b = register(srv)
    cookie_a = signed_in_browser(srv, email_a, password_a).cookies["cc_device"]
    cookie_b = signed_in_browser(srv, email_b, password_b).cookies["cc_device"]
    fail_logins(srv, [email_b] * 5, password_b)
    nonce, _, signature = cookie_b.partition(".")
    swapped = "B" if signature[0] == "A" else "A"
    for cookie in (
        cookie_a,  # signed, but for account A
        f"{nonce}.{swapped}{signature[1:]}",  # B's cookie, signature altered
        f"{random_hex(11)}.{signature}",  # B's signature on another nonce
        f"{'A' * 22}.{'A' * 22}",  # made up
        "",
    ):
        browser = stranger(srv)
        browser.cookies["cc_device"] = cookie
        assert_uniform_401(browser.login(email_b, password_b))
    genuine = stranger(srv)
    genuine.cookies["cc_device"] = cookie_b
    assert genuine.login(email_b, password_b).status == 200


@pytest.mark.parametrize("setup", SETUPS)
def test_known_browser_failures_count_against_that_browser_only(
    make_server: ServerFactory, setup: str
) -> None:
    """Issue 12 point 2: a known browser's own failures lock it, not the account elsewhere."""
    srv = make_server.start(setup, {"RATE_LOGIN_IDENTIFIER": "3/600", "RATE_LOGIN_IP": HIGH_LOGIN})
    email, password = register(srv)
    device = signed_in_browser(srv, email, password)  # 1 attempt on the account's limit
    for _ in range(3):
        assert_uniform_401(device.login(email, "wrong-" + password))
    assert_uniform_401(device.login(email, password))  # its own limit of 3 is used up
    # Those failures were not the account's: a new browser still gets in (attempt 2 of 3).
    newcomer = stranger(srv)
    assert newcomer.login(email, password).status == 200
    assert newcomer.cookies.get("cc_device") not in (None, device.cookies["cc_device"])


@pytest.mark.parametrize("setup", SETUPS)
def test_attempt_refused_by_its_address_costs_the_account_nothing(
    make_server: ServerFactory, setup: str
) -> None:
    """Issue 12 point 2: an attacker over his address limit cannot burn the victim's limit."""
    srv = make_server.start(setup, {"RATE_LOGIN_IP": "2/600", "RATE_LOGIN_IDENTIFIER": "3/600"})
    email, password = register(srv)
    attacker = stranger(srv)
    for _ in range(12):
        assert_uniform_401(attacker.login(email, "wrong-" + password))
    assert_uniform_401(attacker.login(email, password))  # his address is over its limit
    # Only the attacker's first 2 attempts reached the account's limit of 3.
    assert stranger(srv).login(email, password).status == 200


def test_attempt_refused_by_its_address_makes_no_identifier_key(
    make_server: ServerFactory, redis_db: RedisDb
) -> None:
    """Issue 12 point 2: logins past the address limit create no Redis key per account they
    name, and a name with no account behind it never does (its answer is the same 401)."""
    srv = make_server.start(
        "postgres", {"RATE_LOGIN_IP": "2/600", "RATE_LOGIN_IDENTIFIER": "3/600"}
    )
    pattern = srv.env["REDIS_KEY_PREFIX"] + "rl:login_id:*"
    for _ in range(20):
        assert_uniform_401(stranger(srv).login(random_email(), strong_password()))
    assert redis_db.client.keys(pattern) == []
    accounts = [register(srv)[0] for _ in range(22)]
    attacker = stranger(srv)
    for email in accounts[:2]:
        assert_uniform_401(attacker.login(email, strong_password()))
    assert len(redis_db.client.keys(pattern)) == 2
    for email in accounts[2:]:
        assert_uniform_401(attacker.login(email, strong_password()))
    assert len(redis_db.client.keys(pattern)) == 2


def test_forgot_makes_no_key_per_unknown_address(
    make_server: ServerFactory, redis_db: RedisDb
) -> None:
    """Issue 12 point 1: password-reset requests naming addresses with no account behind
    them create no counter each (they could fill Redis); a real account's count is kept."""
    srv = make_server.start("postgres", {"RATE_FORGOT_IP": "1000/3600"})
    pattern = srv.env["REDIS_KEY_PREFIX"] + "rl:forgot_id:*"
    for _ in range(30):
        answer = stranger(srv).post("/auth/password/forgot", {"identifier": random_email()})
        assert answer.status == 200 and answer.json() == {"ok": True}
    email, _ = register(srv)
    assert stranger(srv).post("/auth/password/forgot", {"identifier": email}).status == 200
    keys = wait_until(lambda: redis_db.client.keys(pattern), 10, what="the account's counter")
    assert len(keys) == 1, keys


# -- point 4: IPv6 clients count by prefix; a bounded Argon2 queue ----------------------------


def _register_from(server: Server, addresses: list[str]) -> list[int]:
    """One registration of a fresh email from each address; the statuses."""
    statuses = []
    for address in addresses:
        client = server.client({"X-Forwarded-For": address})
        statuses.append(client.register(random_email(), strong_password()).status)
    return statuses


@pytest.mark.parametrize("setup", SETUPS)
def test_ipv6_registrations_count_by_their_64(make_server: ServerFactory, setup: str) -> None:
    """Issue 12 point 4: 12 addresses of one /64 share RATE_REGISTER_IP, 12 /64s do not."""
    srv = make_server.start(setup, {"RATE_REGISTER_IP": "10/3600", "RATE_REGISTER_EMAIL": HIGH})
    one_64 = [f"2001:db8:1:2::{n:x}" for n in range(1, 13)]
    assert _register_from(srv, one_64) == [201] * 10 + [429] * 2
    many_64 = [f"2001:db8:1:{n + 2:x}::1" for n in range(1, 13)]
    assert _register_from(srv, many_64) == [201] * 12


def test_ipv6_prefix_length_48_groups_a_48(make_server: ServerFactory) -> None:
    """Issue 12 point 4: with IPV6_PREFIX_LENGTH=48, different /64s of one /48 share a limit."""
    srv = make_server.start(
        "embedded",
        {"IPV6_PREFIX_LENGTH": "48", "RATE_REGISTER_IP": "10/3600", "RATE_REGISTER_EMAIL": HIGH},
    )
    one_48 = [f"2001:db8:7:{n:x}::1" for n in range(1, 13)]
    assert _register_from(srv, one_48) == [201] * 10 + [429] * 2
    assert _register_from(srv, ["2001:db8:8:1::1"]) == [201]


def test_ipv4_mapped_address_counts_as_the_ipv4_address(make_server: ServerFactory) -> None:
    """Issue 12 point 4: ::ffff:a.b.c.d and a.b.c.d count against one RATE_REGISTER_IP."""
    srv = make_server.start(
        "embedded", {"RATE_REGISTER_IP": "10/3600", "RATE_REGISTER_EMAIL": HIGH}
    )
    mixed = ["198.51.100.7", "::ffff:198.51.100.7", "::ffff:c633:6407"] * 4
    assert _register_from(srv, mixed) == [201] * 10 + [429] * 2
    assert _register_from(srv, ["198.51.100.8", "::ffff:198.51.100.9"]) == [201, 201]


@pytest.mark.parametrize("setup", SETUPS)
def test_ipv6_logins_count_by_their_64(make_server: ServerFactory, setup: str) -> None:
    """Issue 12 point 4: RATE_LOGIN_IP counts an IPv6 client by its /64."""
    srv = make_server.start(setup, {"RATE_LOGIN_IP": "3/600", "RATE_LOGIN_IDENTIFIER": HIGH_LOGIN})
    email, password = register(srv)
    for n in range(1, 4):
        client = srv.client({"X-Forwarded-For": f"2001:db8:5:6::{n}"})
        assert_uniform_401(client.login(email, "wrong-" + password))
    assert_uniform_401(srv.client({"X-Forwarded-For": "2001:db8:5:6::99"}).login(email, password))
    other_64 = srv.client({"X-Forwarded-For": "2001:db8:5:7::1"})
    assert other_64.login(email, password).status == 200


# ~0.2 s per hash on the 2-core test box (measured once, to choose them; not asserted).
SLOW_ARGON2 = {"ARGON2_TIME_COST": "3", "ARGON2_MEMORY_KIB": "65536", "ARGON2_PARALLELISM": "1"}


def test_argon2_queue_is_bounded(make_server: ServerFactory) -> None:
    """Issue 12 point 4: beyond ARGON2_MAX_QUEUE waiting checks, logins get 503 busy."""
    srv = make_server.start(
        "embedded",
        {
            **SLOW_ARGON2,
            "ARGON2_MAX_CONCURRENCY": "1",
            "ARGON2_MAX_QUEUE": "2",
            "RATE_LOGIN_IP": HIGH_LOGIN,
            "RATE_LOGIN_IDENTIFIER": HIGH_LOGIN,
        },
    )
    email, password = register(srv)
    total = 30
    barrier = threading.Barrier(total)

    def attempt(_: int) -> Response:
        """Wait for every thread, then try one wrong password from a fresh address."""
        client = stranger(srv)
        barrier.wait(timeout=10)
        body = {"identifier": email, "password": "wrong-" + password}
        return client.post("/auth/login", body, timeout=60)

    with ThreadPoolExecutor(max_workers=total) as pool:
        answers = list(pool.map(attempt, range(total)))
    statuses = [answer.status for answer in answers]
    assert set(statuses) <= {401, 503}, statuses
    busy = [answer for answer in answers if answer.status == 503]
    assert busy, statuses
    for answer in busy:
        assert_error(answer, 503, "busy")
        assert answer.header("Retry-After") == "1", answer.headers
    for answer in answers:
        if answer.status == 401:
            assert answer.json() == INVALID_CREDENTIALS
    assert stranger(srv).login(email, password).status == 200


# -- in-process: address_key, and the key-value stores' windows -------------------------------


@pytest.mark.parametrize(
    ("address", "prefix", "expected"),
    [
        ("198.51.100.7", 64, "198.51.100.7"),
        ("198.51.100.7", 48, "198.51.100.7"),
        ("2001:db8:1:2::5", 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:ffff:0:0:1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::5", 48, "2001:db8:1::/48"),
        ("2001:db8:1:99::5", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2::5", 128, "2001:db8:1:2::5/128"),
        ("::ffff:198.51.100.7", 64, "198.51.100.7"),
        ("::ffff:c633:6407", 48, "198.51.100.7"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("fe80::2%eth1", 64, "fe80::/64"),
        ("garbage", 64, "garbage"),
        ("", 64, ""),
        ("unknown", 64, "unknown"),
    ],
)
def test_address_key(address: str, prefix: int, expected: str) -> None:
    """Issue 12 point 4: IPv4 as is, IPv6 by its network, IPv4-mapped as IPv4, junk as is."""
    assert cloudchat.address_key(address, prefix) == expected


class FakeClock:
    """Stands in for the `time` module inside cloudchat: a monotonic clock moved by hand."""

    def __init__(self) -> None:
        """Start at an arbitrary instant."""
        self.now = 1000.0

    def monotonic(self) -> float:
        """The current fake instant."""
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A fake clock for cloudchat's MemoryStore (only its `time` name is replaced)."""
    fake = FakeClock()
    monkeypatch.setattr(cloudchat, "time", fake)
    return fake


def test_hit_many_stops_counting_at_the_first_exceeded_window(clock: FakeClock) -> None:
    """Issue 12 point 2: windows after the first one over its limit are not counted."""
    kv = cloudchat.MemoryStore()
    windows = [("ip", 60, 2), ("account", 600, 5)]
    assert kv.hit_many(windows)[0] == [(1, 60), (1, 600)]
    clock.now += 10
    assert kv.hit_many(windows)[0] == [(2, 50), (2, 590)]
    for _ in range(5):
        counts, _ = kv.hit_many(windows)
        assert counts == [(counts[0][0], 50), (3, 590)]  # reported as if counted, not kept
    assert kv.hit_many([("account", 600, 5)])[0] == [(3, 590)]
    # A later window that does not exist yet is neither created nor reported.
    assert kv.hit_many([("ip", 60, 2), ("fresh", 600, 5)])[0] == [(8, 50), (0, 0)]
    assert kv.get("fresh") is None
    # The first window reopens after its 60 s: counting goes on through the second.
    clock.now += 50
    assert kv.hit_many(windows)[0] == [(1, 60), (4, 540)]


def test_hit_many_reports_retry_after_of_an_exceeded_later_window(clock: FakeClock) -> None:
    """Issue 12 point 2: a later window is not counted, yet its Retry-After counts once over."""
    kv = cloudchat.MemoryStore()
    rules = [(cloudchat.RateLimit(1, 60), "a", "x"), (cloudchat.RateLimit(2, 3000), "b", "y")]
    assert cloudchat.over_rate_limits(kv, rules) is None  # a 1, b 1
    clock.now += 5
    for _ in range(3):  # a over; b would be 2 of 2 each time, so only a sets the wait
        assert cloudchat.over_rate_limits(kv, rules) == 55
    clock.now += 60
    assert cloudchat.over_rate_limits(kv, rules) is None  # a reopened: a 1, b 2 of 2
    clock.now += 5
    # a over again; b, not counted, would be 3 of 2: its reopening is the later one.
    assert cloudchat.over_rate_limits(kv, rules) == 2930


def test_hit_many_reads_a_list_in_the_same_call(clock: FakeClock) -> None:
    """Issue 12 point 1: the history list comes back with the counts, its expiry untouched."""
    kv = cloudchat.MemoryStore()
    kv.append_list("chat:x", ["one", "two", "three"], keep=2, ttl=100)
    counts, items = kv.hit_many([("c", 60, 5)], read_list="chat:x")
    assert counts == [(1, 60)] and items == ["two", "three"]
    clock.now += 99
    assert kv.hit_many([("c", 60, 5)], read_list="chat:x")[1] == ["two", "three"]
    clock.now += 1
    assert kv.hit_many([("c", 60, 5)], read_list="chat:x")[1] == []


def test_add_to_windows_sums_this_window_and_the_one_before(clock: FakeClock) -> None:
    """Issue 12 point 1: the history budget adds this window's total to the previous one's."""
    kv = cloudchat.MemoryStore()
    assert kv.add_to_windows("budget:1", "budget:0", 100, 120) == 100
    assert kv.add_to_windows("budget:1", "budget:0", 50, 120) == 150
    clock.now += 60
    assert kv.add_to_windows("budget:2", "budget:1", 7, 120) == 157
    assert kv.add_to_windows("budget:2", "budget:1", 3, 120) == 160
    clock.now += 60  # budget:1 (created at 0 s, ttl 120 s) has expired; budget:2 has not
    assert kv.add_to_windows("budget:3", "budget:2", 1, 120) == 11
    clock.now += 60
    assert kv.add_to_windows("budget:4", "budget:3", 0, 120) == 1


def test_redis_hit_many_stops_counting_at_the_first_exceeded_window(redis_db: RedisDb) -> None:
    """Issue 12 point 2: the Redis script counts windows in order up to the first one over."""
    kv = cloudchat.RedisStore(redis_db.url, f"cc-unit-{random_hex(4)}:", 3.0, 2)
    try:
        windows = [("ip", 60, 2), ("account", 600, 5)]
        assert [count for count, _ in kv.hit_many(windows)[0]] == [1, 1]
        assert [count for count, _ in kv.hit_many(windows)[0]] == [2, 2]
        for n in range(3, 6):
            counts, _ = kv.hit_many(windows)
            assert [count for count, _ in counts] == [n, 3]  # reported as if counted, not kept
            assert 0 < counts[0][1] <= 60 and 0 < counts[1][1] <= 600, counts
        assert kv.hit_many([("account", 600, 5)])[0][0][0] == 3
        assert kv.hit_many([("ip", 60, 2), ("fresh", 600, 5)])[0][1] == (0, 0)
        assert kv.get("fresh") is None
    finally:
        kv.close()
