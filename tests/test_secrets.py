"""Secrets and abuse: nothing secret stored in clear, production cookies, login timing, SQL
metacharacters, rate limits under simultaneous bursts, session fixation.

"In clear" is checked the way a stolen backup would be read: every row of every SQL table,
every key and value of the run's Redis database, and the raw bytes of the SQLite file.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
import statistics
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import SETUPS, RedisDb, ServerFactory, shared_server
from tests.fakeprovider import FakeProvider
from tests.helpers import (
    ALL_LIMITS_RAISED,
    HIGH_LIMITS,
    INVALID_CREDENTIALS,
    TEST_SECRET_KEY,
    Client,
    Response,
    Server,
    assert_error,
    logged,
    random_email,
    random_hex,
    strong_password,
    wait_until,
)
from tests.hostile_storage import redis_items, sql_tables, sql_text, sqlite_file_bytes

PRODUCTION_ARGON2 = {
    "ARGON2_TIME_COST": None,
    "ARGON2_MEMORY_KIB": None,
    "ARGON2_PARALLELISM": None,
}
_addresses = itertools.count(1)


def new_ip() -> str:
    """An address from 198.18.0.0/15 (benchmarking, never contacted) not used before here."""
    n = next(_addresses)
    return f"198.18.{n // 250}.{n % 250 + 1}"


def sha256(text: str) -> str:
    """The hex SHA-256 of a token, as the server stores it."""
    return hashlib.sha256(text.encode()).hexdigest()


def register(server: Server, email: str | None = None, **extra: Any) -> tuple[str, str]:
    """Register a fresh account from a fresh client address; (email, password)."""
    email, password = email or random_email(), strong_password()
    client = server.client({"X-Forwarded-For": new_ip()})
    response = client.register(email, password, **extra)
    assert response.status == 201, response
    return email, password


@pytest.fixture(scope="module", params=SETUPS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server per setup with limits out of the way and reset tokens in the forgot answer."""
    yield from shared_server(
        request, tmp_path_factory, {**ALL_LIMITS_RAISED, "DEBUG_RETURN_RESET_TOKEN": "1"}
    )


# -- secrets at rest --------------------------------------------------------------------------


def test_no_secret_is_stored_in_clear(server: Server, request: pytest.FixtureRequest) -> None:
    """Passwords, session ids, reset tokens and the visitor id: only hashes in SQL and Redis."""
    found: dict[str, str] = {}
    client = server.client({"User-Agent": "secrets-test"})
    email, password = random_email(), strong_password()
    found["password"] = password
    assert client.register(email, password, display_name="Secret Keeper").status == 201
    assert client.login(email, password).status == 200
    found["session (logged out)"] = client.cookies["cc_auth"]
    assert client.post("/auth/logout").status == 200
    other = server.client()
    assert other.login(email, password).status == 200
    found["session (revoked by reset)"] = other.cookies["cc_auth"]

    first = server.client().post("/auth/password/forgot", {"identifier": email}).json()
    found["reset token (used)"] = first["debug_token"]
    found["password (after reset)"] = strong_password()
    reset = server.client().post(
        "/auth/password/reset",
        {"token": first["debug_token"], "password": found["password (after reset)"]},
    )
    assert reset.status == 200 and reset.json()["revoked_sessions"] == 1, reset

    assert client.login(email, found["password (after reset)"]).status == 200
    found["session (live)"] = client.cookies["cc_auth"]
    found["device cookie"] = client.cookies["cc_device"]
    chat = client.post("/deepseek_chat", {"message": "tell me a secret"})
    assert chat.status == 200 and chat.body.endswith(b'{"done":true}\n'), chat
    visitor = server.client()
    chat = visitor.post("/deepseek_chat", {"message": "tell me a secret"})
    assert chat.status == 200 and chat.body.endswith(b'{"done":true}\n'), chat
    found["visitor id"] = visitor.cookies["cc_app"]
    found["password (after change)"] = strong_password()
    change = client.post(
        "/auth/password/change",
        {
            "current_password": found["password (after reset)"],
            "new_password": found["password (after change)"],
        },
    )
    assert change.status == 200, change
    assert client.me().status == 200
    # Issued after the change, which ends every reset link out before it.
    second = server.client().post("/auth/password/forgot", {"identifier": email})
    found["reset token (live)"] = second.json()["debug_token"]

    tables = sql_tables(server)
    text = sql_text(tables)
    # The dumps are of the right place: the live session and reset token are there, hashed.
    assert sha256(found["session (live)"]) in text, text[:2000]
    assert sha256(found["reset token (live)"]) in text, text[:2000]
    leaks = [name for name, secret in found.items() if secret in text]
    assert not leaks, f"in clear in SQL: {leaks}"

    if server.setup == "postgres":
        rdb: RedisDb = request.getfixturevalue("redis_db")
        items = redis_items(rdb.client)
        prefix = server.env["REDIS_KEY_PREFIX"].encode()
        keys = [key for key, _ in items if key.startswith(prefix)]
        assert prefix + b"sess:" + sha256(found["session (live)"]).encode() in keys, keys
        history = prefix + b"chat:" + sha256(found["visitor id"])[:32].encode()
        assert history in keys, keys
        leaks = [
            name
            for name, secret in found.items()
            for key, value in items
            if secret.encode() in key or secret.encode() in value
        ]
        assert not leaks, f"in clear in Redis: {sorted(set(leaks))}"
    else:
        raw = sqlite_file_bytes(server)
        assert sha256(found["session (live)"]).encode() in raw
        leaks = [name for name, secret in found.items() if secret.encode() in raw]
        assert not leaks, f"in clear in the SQLite files: {leaks}"

    logged(server, f"rid={second.header('X-Request-ID')}")  # the last request's line is in
    log = server.log_text()
    leaks = [name for name, secret in found.items() if secret in log]
    assert not leaks, f"in clear in the log: {leaks}"


# -- production cookies -----------------------------------------------------------------------


def test_cookie_flags_in_production(make_server: ServerFactory) -> None:
    """CLOUDCHAT_ENV=production: cc_auth and cc_app are Secure, HttpOnly, SameSite=Lax."""
    provider = FakeProvider()
    try:
        server = make_server.start(
            "postgres",
            {
                **HIGH_LIMITS,
                **PRODUCTION_ARGON2,
                "CLOUDCHAT_ENV": "production",
                "COOKIE_SECURE": "1",
                "FRONTEND_BASE_URL": "https://chat.example.com",
                "DEEPSEEK_API_KEY": "sk-production-test",
                "SECRET_KEY": TEST_SECRET_KEY,
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": "9",
                "DEEPSEEK_BASE_URL": provider.url(),
            },
        )
        client = server.client()
        email, password = random_email(), strong_password()
        assert client.register(email, password).status == 201
        login = client.login(email, password)
        assert login.status == 200, login
        auth = login.cookie("cc_auth")
        assert auth is not None, login.headers
        _, attrs = auth
        assert {"secure", "httponly"} <= set(attrs), attrs
        assert attrs.get("samesite") == "Lax" and attrs.get("path") == "/", attrs
        assert attrs.get("max-age") == "604800", attrs

        device = login.cookie("cc_device")
        assert device is not None, login.headers
        assert {"secure", "httponly"} <= set(device[1]), device
        assert device[1].get("samesite") == "Lax" and device[1].get("path") == "/", device

        # A visitor id is issued to an anonymous visitor (a logged-in one chats as the account).
        chat = server.client().post("/deepseek_chat", {"message": "hi"})
        assert chat.status == 200 and b'"done":true' in chat.body, chat
        app = chat.cookie("cc_app")
        assert app is not None, chat.headers
        _, attrs = app
        assert {"secure", "httponly"} <= set(attrs), attrs
        assert attrs.get("samesite") == "Lax" and attrs.get("path") == "/", attrs

        logout = client.post("/auth/logout")
        expired = logout.cookie("cc_auth")
        assert expired is not None and expired[1].get("max-age") == "0", logout.headers
        assert {"secure", "httponly"} <= set(expired[1]), expired
    finally:
        provider.stop()


# -- login timing -----------------------------------------------------------------------------

TIMING_ROUNDS = 20


def test_login_timing_unknown_account_vs_wrong_password(make_server: ServerFactory) -> None:
    """With production Argon2 the two failures cost the same: medians within 0.7..1.4."""
    server = make_server.start("embedded", {**HIGH_LIMITS, **PRODUCTION_ARGON2})
    with ThreadPoolExecutor(max_workers=2) as pool:
        accounts = list(pool.map(lambda _: register(server), range(TIMING_ROUNDS + 1)))
    client = server.client()

    def unknown() -> float:
        response = client.login(random_email(), strong_password())
        assert response.json() == INVALID_CREDENTIALS, response
        return response.elapsed

    def wrong(email: str, password: str) -> float:
        response = client.login(email, "wrong-" + password)
        assert response.json() == INVALID_CREDENTIALS, response
        return response.elapsed

    unknown()  # warm-up: the first unknown account makes the dummy hash
    wrong(*accounts[-1])
    unknown_times, wrong_times = [], []
    for n, (email, password) in enumerate(accounts[:TIMING_ROUNDS]):
        # ABBA order, so that a drift in machine load weighs on both sides alike.
        if n % 2:
            unknown_times.append(unknown())
            wrong_times.append(wrong(email, password))
        else:
            wrong_times.append(wrong(email, password))
            unknown_times.append(unknown())
    unknown_median = statistics.median(unknown_times)
    wrong_median = statistics.median(wrong_times)
    ratio = unknown_median / wrong_median
    print(
        f"login timing (production Argon2, {TIMING_ROUNDS} each): unknown account median"
        f" {unknown_median * 1000:.1f} ms, wrong password median {wrong_median * 1000:.1f} ms,"
        f" ratio {ratio:.2f}"
    )
    assert wrong_median > 0.01, "production Argon2 should dominate a failed login"
    assert 0.7 <= ratio <= 1.4, (ratio, unknown_times, wrong_times)


# -- SQL metacharacters -----------------------------------------------------------------------

PAYLOADS = [
    "' OR 1=1 --",
    "' OR '1'='1' --",
    "admin'--",
    '"; DROP TABLE users; --',
    "'; DELETE FROM credentials; --",
    "' UNION SELECT secret FROM credentials --",
    "' || (SELECT secret FROM credentials LIMIT 1) || '",
    "'; SELECT pg_sleep(3); --",
    "'; CREATE TABLE injected (x int); --",  # a trace only an injection could leave
    "1; UPDATE users SET is_active = false",
    "%s",
    "%(email)s",
    "%%s",
    "?",
    "\\",
    "\\'",
    "`",
    "$$",
    "');--",
    "/*",
    "\x00",
    "a\x00b",
    "' OR 1=1\x00",
]
FIELDS = {
    "/auth/register": ("email", "password", "display_name", "phone"),
    "/auth/login": ("identifier", "password"),
    "/auth/password/forgot": ("identifier", "email"),
    "/auth/password/reset": ("token", "password"),
    "/auth/password/change": ("current_password", "new_password"),
    "/deepseek_chat": ("message",),
}


def _assert_json_answer(response: Response, what: str) -> None:
    """Not a 5xx, and either an ok answer or the error envelope."""
    assert response.status < 500, f"{response!r} for {what}"
    if response.status >= 400:
        body = response.json()
        assert body.get("ok") is False and isinstance(body.get("code"), str), f"{body} {what}"
    elif (response.header("Content-Type") or "").startswith("application/json"):
        assert response.json().get("ok") is True, f"{response!r} for {what}"


def test_sql_metacharacters_and_nul_in_every_field(server: Server) -> None:
    """Every field of every JSON endpoint with SQL metacharacters and NUL: never a 5xx."""
    earlier = [register(server) for _ in range(3)]
    before = {user["email"] for user in sql_tables(server)["users"]}
    assert {email for email, _ in earlier} <= before

    quoted, quoted_password = register(server, f"o'brien+x-{random_hex(3)}@example.com")
    odd, odd_password = register(server, f"'%s'--{random_hex(3)}@example.com")
    name = "Robert'); DROP TABLE users;--"
    named_client = server.client()
    named, named_password = register(server, display_name=name)

    change_email, change_password = register(server)
    changer = server.client()
    assert changer.login(change_email, change_password).status == 200
    # Reset requests that get through change this throwaway account's password, nobody else's.
    throwaway = register(server)[0]
    token = server.client().post("/auth/password/forgot", {"identifier": throwaway}).json()

    def valid_body(path: str) -> dict[str, str]:
        """A body that would pass, before one field is replaced."""
        return {
            "/auth/register": {"email": random_email(), "password": strong_password()},
            "/auth/login": {"identifier": named, "password": named_password},
            "/auth/password/forgot": {"identifier": named},
            "/auth/password/reset": {"token": token["debug_token"], "password": "Pw-unused-1"},
            "/auth/password/change": {
                "current_password": change_password,
                "new_password": strong_password(),
            },
            "/deepseek_chat": {"message": "hello"},
        }[path]

    stored: list[str] = []  # addresses with metacharacters that registered: kept verbatim
    for path, fields in FIELDS.items():
        for field, payload in itertools.product(fields, PAYLOADS):
            for value in (payload, f"x{payload}9Aa", f"{random_hex(2)}{payload}@example.com"):
                body = {**valid_body(path), field: value}
                sender = changer if path == "/auth/password/change" else server.client()
                response = sender.post(path, body)
                _assert_json_answer(response, f"{path} {field}={value!r}")
                if path == "/auth/login" and field == "identifier":
                    assert response.status != 200, f"logged in with identifier {value!r}"
                if path == "/auth/password/change" and response.status == 200:
                    change_password = body["new_password"]
                if path == "/auth/register" and response.status == 201:
                    stored.append(body["email"].strip().lower())

    after = sql_tables(server)
    # An injected statement would have left its table (what a pg_sleep would only show as time).
    assert "injected" not in after, sorted(after)
    emails = {user["email"] for user in after["users"]}
    assert before <= emails, f"users gone: {before - emails}"
    assert set(stored) <= emails, f"not stored as sent: {set(stored) - emails}"
    assert len(after["credentials"]) == len(after["users"]), (after["credentials"], emails)
    for email, password in [*earlier, (quoted, quoted_password), (odd, odd_password)]:
        client = server.client()
        assert client.login(email, password).status == 200, email
        assert client.me().json()["user"]["email"] == email.lower()
    assert named_client.login(named, named_password).status == 200
    assert named_client.me().json()["user"]["display_name"] == name


# -- rate limits under bursts -----------------------------------------------------------------

LIMIT = 3
BURST = LIMIT + 10
LIMITED = {
    **{
        name: f"{LIMIT}/600"
        for name in (
            "RATE_REGISTER_IP",
            "RATE_REGISTER_EMAIL",
            "RATE_LOGIN_IP",
            "RATE_LOGIN_IDENTIFIER",
            "RATE_FORGOT_IP",
            "RATE_FORGOT_IDENTIFIER",
            "RATE_CHAT_VISITOR",
            "RATE_CHAT_IP",
        )
    },
    "DEBUG_RETURN_RESET_TOKEN": "1",
}


@pytest.fixture(scope="module", params=SETUPS)
def limited(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server per setup where every rate limit is LIMIT per 10 minutes."""
    yield from shared_server(request, tmp_path_factory, LIMITED)


def burst(attempts: list[Callable[[], Response]]) -> list[Response]:
    """Run the attempts at once: threads released together by a barrier."""
    barrier = threading.Barrier(len(attempts))

    def run(attempt: Callable[[], Response]) -> Response:
        barrier.wait(timeout=10)
        return attempt()

    with ThreadPoolExecutor(max_workers=len(attempts)) as pool:
        return list(pool.map(run, attempts))


def _chat(server: Server, ip: str, visitor: str | None) -> Callable[[], Response]:
    """One chat request from this address, as this visitor (None: a new one)."""

    def attempt() -> Response:
        client = server.client({"X-Forwarded-For": ip})
        if visitor:
            client.cookies["cc_app"] = visitor
        return client.post("/deepseek_chat", {"message": "hi"})

    return attempt


@pytest.mark.parametrize(
    "rule",
    [
        "register_ip",
        "register_email",
        "login_ip",
        "login_identifier",
        "forgot_ip",
        "forgot_identifier",
        "chat_visitor",
        "chat_ip",
    ],
)
def test_burst_never_passes_more_than_the_limit(limited: Server, rule: str) -> None:
    """LIMIT+10 simultaneous attempts against one key: at most LIMIT get through."""
    server = limited
    shared_ip = new_ip()

    def client(ip: str | None = None) -> Client:
        return server.client({"X-Forwarded-For": ip or new_ip()})

    attempts: list[Callable[[], Response]]
    if rule == "register_ip":
        attempts = [
            lambda: client(shared_ip).register(random_email(), strong_password())
            for _ in range(BURST)
        ]
    elif rule == "register_email":
        email = random_email()
        attempts = [lambda: client().register(email, strong_password()) for _ in range(BURST)]
    elif rule == "login_ip":
        accounts = [register(server) for _ in range(BURST)]
        attempts = [lambda a=a: client(shared_ip).login(*a) for a in accounts]
    elif rule == "login_identifier":
        account = register(server)
        attempts = [lambda: client().login(*account) for _ in range(BURST)]
    elif rule == "forgot_ip":
        emails = [register(server)[0] for _ in range(BURST)]
        attempts = [
            lambda e=e: client(shared_ip).post("/auth/password/forgot", {"identifier": e})
            for e in emails
        ]
    elif rule == "forgot_identifier":
        email = register(server)[0]
        attempts = [
            lambda: client().post("/auth/password/forgot", {"identifier": email})
            for _ in range(BURST)
        ]
    elif rule == "chat_visitor":
        # Only an id the server issued is a visitor (a made-up one is replaced): get one.
        issuer = client()
        assert issuer.post("/deepseek_chat", {"message": "hi"}).status == 200
        visitor = issuer.cookies["cc_app"]
        attempts = [_chat(server, new_ip(), visitor) for _ in range(BURST)]
    else:
        attempts = [_chat(server, shared_ip, None) for _ in range(BURST)]

    first_line = len(server.logs)
    results = burst(attempts)
    statuses = sorted(r.status for r in results)
    if rule.startswith("register"):
        passed = [r for r in results if r.status != 429]
        for response in results:
            if response.status == 429:
                assert_error(response, 429, "rate_limited")
        assert set(statuses) <= {201, 409, 429}, statuses
        assert [r.status for r in passed].count(201) >= 1, statuses
    elif rule.startswith("login"):
        passed = [r for r in results if r.status == 200]
        assert set(statuses) <= {200, 401}, statuses
        for response in results:
            if response.status == 401:
                assert response.json() == INVALID_CREDENTIALS
    elif rule.startswith("forgot"):
        assert statuses == [200] * BURST, statuses
        passed = [r for r in results if "debug_token" in r.json()]

        def counted() -> tuple[int, int]:
            """(reset mails written to the log, requests refused by the limit) so far."""
            lines = server.logs[first_line:]
            return (
                sum("mail reset to" in line for line in lines),
                sum("password reset: over the rate limit" in line for line in lines),
            )

        expected = (len(passed), BURST - len(passed))
        wait_until(
            lambda: all(n >= e for n, e in zip(counted(), expected, strict=True)),
            5,
            what=f"{expected} mails and refusals logged",
        )
        assert counted() == expected
    else:
        passed = [r for r in results if r.status == 200]
        assert set(statuses) <= {200, 429}, statuses
    print(f"{rule} ({server.setup}): {len(passed)} of {BURST} through, statuses {statuses}")
    assert 1 <= len(passed) <= LIMIT, statuses


# -- session fixation -------------------------------------------------------------------------


def test_session_fixation(server: Server, request: pytest.FixtureRequest) -> None:
    """A cc_auth value set before login is never the one issued, and never becomes valid."""
    email, password = register(server)
    planted = secrets.token_urlsafe(32)  # exactly the shape of a real session id
    victim = server.client()
    victim.cookies["cc_auth"] = planted
    assert_error(victim.me(), 401, "unauthorized")
    login = victim.login(email, password)
    assert login.status == 200, login
    issued = victim.cookies["cc_auth"]
    assert issued != planted
    assert victim.me().json()["user"]["email"] == email

    attacker = server.client()
    attacker.cookies["cc_auth"] = planted
    assert_error(attacker.me(), 401, "unauthorized")
    # Again after a logout and another login that carries the planted value.
    assert victim.post("/auth/logout").status == 200
    victim.cookies["cc_auth"] = planted
    assert victim.login(email, password).status == 200
    assert victim.cookies["cc_auth"] not in (planted, issued)
    assert_error(attacker.me(), 401, "unauthorized")

    # A live session of the attacker's own account, planted in the victim's browser: the
    # victim's login ends it and the victim gets a session of their own.
    attacker_email, attacker_password = register(server)
    assert attacker.login(attacker_email, attacker_password).status == 200
    own = attacker.cookies["cc_auth"]
    browser = server.client()
    browser.cookies["cc_auth"] = own
    assert browser.login(email, password).status == 200
    assert browser.cookies["cc_auth"] != own
    assert browser.me().json()["user"]["email"] == email
    assert_error(attacker.me(), 401, "unauthorized")

    stored = sql_text(sql_tables(server))
    assert sha256(planted) not in stored and planted not in stored
    if server.setup == "postgres":
        rdb: RedisDb = request.getfixturevalue("redis_db")
        assert not [key for key, _ in redis_items(rdb.client) if sha256(planted).encode() in key]
