"""Issue 15: an account's own data - DELETE /auth/me (nothing but a tombstone stays behind,
in SQL or Redis) and GET /auth/me/export (everything about the caller, nothing of others)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import SETUPS, RedisDb, shared_server
from tests.helpers import (
    ALL_LIMITS_RAISED,
    INVALID_CREDENTIALS,
    UNAUTHORIZED,
    Client,
    Response,
    Server,
    assert_error,
    random_email,
    random_hex,
    random_phone,
    sql_rows,
    strong_password,
    wait_until,
)
from tests.mailsink import MailSink, Received

CHAT = "/deepseek_chat"
EXPIRED_COOKIES = ("cc_auth", "cc_app", "cc_device")
CHANGE_LINK_RE = re.compile(r"/verify_email\?token=([A-Za-z0-9_\-]+)")
RESET_LINK_RE = re.compile(r"/reset_password\?token=([A-Za-z0-9_\-]+)")
DELETED_SUBJECT = "Your CloudChat account was deleted"
RACE_TRIALS = 6
# The rate-limit counters a deletion must remove (spec: rl:<action>:<sha256("user:<id>")[:32]>).
ACCOUNT_ACTIONS = ("login_id", "forgot_id", "resend_id", "email_change_id", "account")


def site_env(sink: MailSink, **extra: str) -> dict[str, str | None]:
    """Limits out of the way, mail to the sink, no chat provider (the offline echo answers)."""
    return {**ALL_LIMITS_RAISED, **sink.env(), "MAIL_RETRIES": "0", **extra}


@pytest.fixture(scope="module", params=SETUPS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sink: MailSink
) -> Iterator[Server]:
    """One server per setup, every limit raised, mailing to the module's sink."""
    yield from shared_server(request, tmp_path_factory, site_env(sink))


@pytest.fixture(scope="module", params=SETUPS)
def strict(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sink: MailSink
) -> Iterator[Server]:
    """One server per setup with low per-account limits: RATE_LOGIN_IDENTIFIER 3/600 (the
    password checks of one session) and RATE_ACCOUNT 2/60 (exports). Each test has its own
    accounts, so their counters never meet."""
    overrides = site_env(sink, RATE_LOGIN_IDENTIFIER="3/600", RATE_ACCOUNT="2/60")
    yield from shared_server(request, tmp_path_factory, overrides)


@pytest.fixture
def redis_client(request: pytest.FixtureRequest, server: Server) -> Any:
    """The Redis client of the run's database when the server uses Redis, else None."""
    if not server.env.get("REDIS_URL"):
        return None
    rdb: RedisDb = request.getfixturevalue("redis_db")
    return rdb.client


# -- helpers ---------------------------------------------------------------------------------


def new_account(server: Server) -> tuple[str, str]:
    """Register a fresh account; (email, password)."""
    email, password = random_email(), strong_password()
    answer = server.client().register(email, password)
    assert answer.status == 201, answer
    return email, password


def signed_in(server: Server, email: str, password: str, agent: str = "tests") -> Client:
    """A new browser (with its own user agent) signed in to the account."""
    browser = server.client({"User-Agent": agent})
    answer = browser.login(email, password)
    assert answer.status == 200, answer
    return browser


def delete_me(client: Client, body: Any) -> Response:
    """DELETE /auth/me with a JSON body."""
    return client.request("DELETE", "/auth/me", json_body=body)


def export(client: Client) -> Response:
    """GET /auth/me/export."""
    return client.get("/auth/me/export")


def replay(server: Server, token: str) -> Client:
    """A new browser that sends only this session cookie."""
    thief = server.client()
    thief.cookies["cc_auth"] = token
    return thief


def user_id_of(server: Server, email: str) -> int:
    """The account's id, from SQL."""
    (row,) = sql_rows(server, "SELECT id FROM users WHERE email = %s", (email,))
    return int(row["id"])


def tombstones(server: Server, user_id: int) -> list[dict[str, Any]]:
    """The account_deleted events of a user id: the account is gone, so the event names it
    in its detail ("user=<id> by=..."), its user_id is NULL."""
    return sql_rows(
        server,
        "SELECT id, event, detail, ip, user_agent, request_id FROM auth_events"
        " WHERE user_id IS NULL AND event = 'account_deleted' AND detail LIKE %s",
        (f"user={user_id} %",),
    )


def chat_round(client: Client, message: str) -> str:
    """One complete chat round with the offline echo provider; the streamed answer."""
    answer = client.post(CHAT, {"message": message})
    assert answer.status == 200, answer
    lines = [json.loads(line) for line in answer.body.decode("utf-8").splitlines() if line]
    assert lines and lines[-1].get("done") is True, lines
    text = "".join(line.get("text", "") for line in lines)
    assert message in text, text
    return text


def sha256(text: str) -> str:
    """Hex SHA-256 of a text (what the server stores instead of tokens)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def wait_mail(sink: MailSink, address: str, pattern: str, timeout: float = 10.0) -> Received:
    """The first mail to the address whose subject or text holds `pattern`, polled."""

    def found() -> Received | None:
        for received in sink.to(address):
            if pattern in str(received.message["Subject"]) or pattern in received.text():
                return received
        return None

    return wait_until(found, timeout, what=f"a mail to {address} with {pattern!r}")


def expired(response: Response, name: str) -> bool:
    """True when the answer expires the named cookie (empty value, Max-Age=0)."""
    cookie = response.cookie(name)
    return cookie is not None and cookie[0] == "" and cookie[1].get("max-age") == "0"


# -- scanning storage for an account ---------------------------------------------------------


def sql_tables(server: Server) -> list[str]:
    """Every table of the server's database, from the catalogue (nothing hard-coded)."""
    if server.env.get("DATABASE_URL"):
        rows = sql_rows(
            server,
            "SELECT table_name AS name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
        )
    else:
        rows = sql_rows(server, "SELECT name FROM sqlite_master WHERE type = 'table'")
    names = sorted(str(row["name"]) for row in rows)
    assert "users" in names and "auth_events" in names, names
    return names


def as_text(value: Any) -> str:
    """A stored value as text, for a substring search."""
    if isinstance(value, memoryview):
        value = value.tobytes()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def sql_traces(
    server: Server, user_id: int, needles: list[str]
) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (table, why, row) in the whole database that names the account: a user_id
    column (or the users table's own id) holding its id, or any column holding one of the
    needles (email, uid, phone, name, hashes). Other tables' own `id` columns are row
    numbers of their own, not account ids, so they are not compared with it."""
    hits = []
    for table in sql_tables(server):
        for row in sql_rows(server, f'SELECT * FROM "{table}"'):
            for column, value in row.items():
                if value is None:
                    continue
                names_id = column == "user_id" or column.endswith("_user_id")
                names_id = names_id or (table == "users" and column == "id")
                if names_id and str(value) == str(user_id):
                    hits.append((table, f"{column}={value}", row))
                    continue
                text = as_text(value)
                for needle in needles:
                    if needle in text:
                        hits.append((table, f"{column} holds {needle!r}", row))
    return hits


def redis_value(client: Any, key: bytes) -> str:
    """A key's whole value as text, whatever its type."""
    kind = client.type(key).decode()
    if kind == "string":
        raw = client.get(key)
        return "" if raw is None else raw.decode("utf-8", "replace")
    if kind == "list":
        items = client.lrange(key, 0, -1)
    elif kind == "hash":
        items = [x for pair in client.hgetall(key).items() for x in pair]
    elif kind == "set":
        items = list(client.smembers(key))
    elif kind == "zset":
        items = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
    else:  # "none": expired between SCAN and TYPE
        items = []
    return "\n".join(item.decode("utf-8", "replace") for item in items)


def redis_snapshot(client: Any, prefix: str) -> dict[str, str]:
    """Every key under the server's prefix (SCAN) with its value as text."""
    snapshot = {}
    for key in client.scan_iter(match=prefix.encode() + b"*", count=1000):
        snapshot[key.decode("utf-8", "replace")] = redis_value(client, key)
    return snapshot


def account_digests(user_id: int, email: str) -> list[str]:
    """The hashed names Redis keys of the account carry: sha256("user:<id>")[:32] (its
    rate-limit counters and its chat history) and sha256(email)[:32] (register_email)."""
    return [sha256(f"user:{user_id}")[:32], sha256(email)[:32]]


def redis_traces(
    snapshot: dict[str, str],
    prefix: str,
    digests: list[str],
    session_hashes: list[str],
    needles: list[str],
) -> list[str]:
    """What in the key space still names the account: a key named by one of its digests; a
    key named by one of its sessions that holds anything but the revocation mark; a value
    holding one of the needles."""
    problems = []
    for key, value in sorted(snapshot.items()):
        name = key[len(prefix) :]
        for digest in digests:
            if digest in name:
                problems.append(f"key {name} is named by {digest}")
        named_by_session = any(h in name for h in session_hashes)
        if named_by_session and not (name.startswith("sess:") and value == "revoked"):
            problems.append(f"session key {name} holds {value[:200]!r}")
        for needle in needles:
            if needle in value:
                problems.append(f"key {name} holds {needle!r}: {value[:200]!r}")
    return problems


# -- DELETE /auth/me: input and refusals -----------------------------------------------------


def test_delete_without_a_session_is_401(server: Server) -> None:
    """No session, or a made-up one: 401 unauthorized, whatever the body."""
    anonymous = server.client()
    answer = delete_me(anonymous, {"password": strong_password()})
    assert answer.status == 401 and answer.json() == UNAUTHORIZED, answer
    forged = replay(server, "A" * 43)
    answer = delete_me(forged, {"password": strong_password()})
    assert answer.status == 401 and answer.json() == UNAUTHORIZED, answer


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"password": ""},
        {"password": None},
        {"password": 12345678},
        {"password": ["x"]},
        {"password": {"p": "x"}},
        {"pass": "x"},
    ],
    ids=["empty", "empty-string", "null", "number", "list", "object", "other-key"],
)
def test_delete_without_a_password_string_is_400(server: Server, body: Any) -> None:
    """A missing, empty or non-string password: 400 invalid_input; the account stays."""
    email, password = new_account(server)
    browser = signed_in(server, email, password)
    assert_error(delete_me(browser, body), 400, "invalid_input")
    assert browser.me().status == 200
    assert sql_rows(server, "SELECT id FROM users WHERE email = %s", (email,))


def test_delete_with_a_wrong_password_keeps_the_account(server: Server) -> None:
    """A wrong password: 401 invalid_credentials, nothing deleted, no cookie expired, the
    attempt audited as password_check_failed (action=delete_account)."""
    email, password = new_account(server)
    browser = signed_in(server, email, password)
    user_id = user_id_of(server, email)
    answer = delete_me(browser, {"password": strong_password()})
    assert answer.status == 401 and answer.json() == INVALID_CREDENTIALS, answer
    assert answer.cookie("cc_auth") is None, answer.headers
    assert browser.me().status == 200
    assert server.client().login(email, password).status == 200
    assert tombstones(server, user_id) == []
    events = sql_rows(
        server,
        "SELECT detail FROM auth_events WHERE user_id = %s AND event = 'password_check_failed'",
        (user_id,),
    )
    assert [e["detail"] for e in events] == ["action=delete_account"], events


# -- DELETE /auth/me: what a deletion does ---------------------------------------------------


def test_delete_ends_the_account_everywhere(server: Server) -> None:
    """The right password: 200, cookies expired; the session (cached with Redis) and the
    account's other device are 401 at once; the old password logs nobody in; the address
    registers again as a new account with none of the old data; another user is untouched."""
    email, password = new_account(server)
    laptop = signed_in(server, email, password, "laptop")
    phone = signed_in(server, email, password, "phone")
    other_email, other_password = new_account(server)
    other = signed_in(server, other_email, other_password, "other")
    old = laptop.me().json()["user"]
    assert phone.me().status == 200 and other.me().status == 200  # cached with Redis
    chat_round(laptop, "remember the old account")
    token, phone_token = laptop.cookies["cc_auth"], phone.cookies["cc_auth"]
    old_ids = [s["id"] for s in laptop.get("/auth/sessions").json()["sessions"]]
    assert len(old_ids) == 2, old_ids
    assert laptop.cookies.get("cc_device")

    answer = delete_me(laptop, {"password": password})
    assert answer.status == 200 and answer.json() == {"ok": True}, answer
    for name in EXPIRED_COOKIES:
        assert expired(answer, name), (name, answer.headers.get_all("Set-Cookie"))

    assert replay(server, token).me().json() == UNAUTHORIZED
    assert replay(server, phone_token).me().json() == UNAUTHORIZED
    assert phone.me().json() == UNAUTHORIZED
    assert laptop.me().json() == UNAUTHORIZED
    assert server.client().login(email, password).json() == INVALID_CREDENTIALS
    assert delete_me(replay(server, token), {"password": password}).json() == UNAUTHORIZED

    assert other.me().json()["user"]["email"] == other_email
    assert server.client().login(other_email, other_password).status == 200

    # The address is free again: a brand-new account that inherits nothing.
    new_password = strong_password()
    assert server.client().register(email, new_password).status == 201
    assert server.client().login(email, password).json() == INVALID_CREDENTIALS
    fresh = signed_in(server, email, new_password, "fresh")
    user = fresh.me().json()["user"]
    assert user["id"] != old["id"] and user["uid"] != old["uid"], (user, old)
    sessions = fresh.get("/auth/sessions").json()["sessions"]
    assert [s["user_agent"] for s in sessions] == ["fresh"], sessions
    data = export(fresh).json()
    assert data["chat_history"] == [], data
    assert [s["user_agent"] for s in data["sessions"]] == ["fresh"], data
    # Its own events only: the registration, the old password refused, the login.
    events = [e["event"] for e in data["events"]]
    assert events == ["register", "login_failed", "login_ok"], data["events"]
    dumped = json.dumps(data)
    for value in (old["uid"], *old_ids, "remember the old account"):
        assert value not in dumped, value


def test_no_table_and_no_key_names_the_deleted_account(
    server: Server, mail: MailSink, redis_client: Any
) -> None:
    """The issue's central case. A rich account (two sessions, a chat round, a pending reset
    link, a pending change of address, a phone and a name, failed logins and a failed
    password check) is deleted; then every table is scanned for its id, uid, addresses,
    phone, name and session hashes, and every Redis key under the server's prefix for its
    hashed names and values: only the account_deleted tombstone remains, and session cache
    keys only as the bare revocation mark."""
    email, password = new_account(server)
    laptop = signed_in(server, email, password, "rich-laptop")
    phone_browser = signed_in(server, email, password, "rich-phone")
    other_email, other_password = new_account(server)
    other = signed_in(server, other_email, other_password, "bystander")
    name = f"Rich Person {random_hex(4)}"
    _, formatted = random_phone()
    patched = laptop.request(
        "PATCH", "/auth/me", json_body={"display_name": name, "phone": formatted}
    )
    assert patched.status == 200, patched
    user = patched.json()["user"]
    user_id, uid, phone = int(user["id"]), str(user["uid"]), str(user["phone"])
    assert user_id == user_id_of(server, email) and phone.lstrip("+").isdigit(), user
    for _ in range(2):
        assert server.client().login(email, strong_password()).json() == INVALID_CREDENTIALS
    assert delete_me(laptop, {"password": strong_password()}).status == 401
    chat_round(laptop, f"a secret of {name}")
    chat_round(phone_browser, "and one more round")
    assert server.client().post("/auth/password/forgot", {"identifier": email}).status == 200
    reset_token = RESET_LINK_RE.search(wait_mail(mail, email, "/reset_password?token=").text())
    assert reset_token is not None
    wait_until(
        lambda: sql_rows(
            server,
            "SELECT id FROM auth_events WHERE user_id = %s AND event = 'reset_link_sent'",
            (user_id,),
        ),
        10,
        what="the reset_link_sent event",
    )
    new_email = random_email()
    change = laptop.post("/auth/email/change", {"password": password, "new_email": new_email})
    assert change.status == 200, change
    change_token = CHANGE_LINK_RE.search(wait_mail(mail, new_email, "/verify_email?token=").text())
    assert change_token is not None
    assert laptop.me().status == 200 and phone_browser.me().status == 200  # cached
    public_ids = [s["id"] for s in laptop.get("/auth/sessions").json()["sessions"]]
    assert len(public_ids) == 2, public_ids
    cookies = [laptop.cookies["cc_auth"], phone_browser.cookies["cc_auth"]]
    session_hashes = [sha256(c) for c in cookies]
    needles = [
        email,
        new_email,
        uid,
        name,
        phone.lstrip("+"),
        *session_hashes,
        *public_ids,
        *cookies,
        reset_token.group(1),
        sha256(reset_token.group(1)),
        change_token.group(1),
        sha256(change_token.group(1)),
    ]
    prefix = server.env.get("REDIS_KEY_PREFIX", "")
    digests = account_digests(user_id, email)

    # The scanners see the account before the deletion (so their silence after it counts).
    before = {table for table, _, _ in sql_traces(server, user_id, needles)}
    expected_tables = {"users", "credentials", "sessions", "password_resets", "email_tokens"}
    assert expected_tables | {"auth_events"} <= before, before
    if redis_client is not None:
        keys_before = redis_snapshot(redis_client, prefix)
        found = redis_traces(keys_before, prefix, digests, session_hashes, needles)
        assert any(f"chat:{digests[0]}" in p for p in found), found
        assert any(f"rl:account:{digests[0]}" in p for p in found), found
        assert any(f"rl:login_id:{digests[0]}" in p for p in found), found
        assert any(f"holds {email!r}" in p for p in found), found

    answer = delete_me(laptop, {"password": password})
    assert answer.status == 200, answer

    (tombstone,) = tombstones(server, user_id)
    assert tombstone["detail"] == f"user={user_id} by=self", tombstone
    assert tombstone["user_agent"] == "rich-laptop" and tombstone["ip"], tombstone
    assert tombstone["request_id"] == answer.header("X-Request-ID"), (tombstone, answer.headers)
    left = [
        (table, why, row)
        for table, why, row in sql_traces(server, user_id, needles)
        if not (table == "auth_events" and row["id"] == tombstone["id"])
    ]
    assert left == [], "rows that still name the deleted account:\n" + "\n".join(map(str, left))

    # Nothing of the bystander went with it.
    assert other.me().json()["user"]["email"] == other_email
    assert server.client().login(other_email, other_password).status == 200

    if redis_client is not None:
        keys_after = redis_snapshot(redis_client, prefix)
        problems = redis_traces(keys_after, prefix, digests, session_hashes, needles)
        assert problems == [], "Redis still names the deleted account:\n" + "\n".join(problems)
        for action in ACCOUNT_ACTIONS:
            assert f"{prefix}rl:{action}:{digests[0]}" not in keys_after


def test_concurrent_deletes_of_one_account(server: Server) -> None:
    """Two deletions of one account at once (from two devices, or twice from one session):
    one 200, the other 401 or 200, never a 5xx; exactly one tombstone either way."""
    for trial in range(RACE_TRIALS):
        email, password = new_account(server)
        first = signed_in(server, email, password, "race-1")
        second = (
            signed_in(server, email, password, "race-2")
            if trial % 2 == 0
            else replay(server, first.cookies["cc_auth"])
        )
        assert first.me().status == 200 and second.me().status == 200
        user_id = user_id_of(server, email)
        barrier = threading.Barrier(2)
        results: list[tuple[int, str | None]] = []

        def remove(
            browser: Client,
            barrier: threading.Barrier = barrier,
            results: list[tuple[int, str | None]] = results,
            password: str = password,
        ) -> None:
            barrier.wait(10)
            answer = delete_me(browser, {"password": password})
            code = answer.json().get("code") if answer.status != 200 else None
            results.append((answer.status, code))  # list.append is atomic

        threads = [threading.Thread(target=remove, args=(b,)) for b in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        statuses = sorted(status for status, _ in results)
        assert statuses in ([200, 200], [200, 401]), (trial, results)
        assert all(code in (None, "unauthorized", "invalid_credentials") for _, code in results)
        assert len(tombstones(server, user_id)) == 1, (trial, results, tombstones(server, user_id))
        assert not sql_rows(server, "SELECT id FROM users WHERE email = %s", (email,))


def test_wrong_passwords_on_delete_count_like_login_attempts(strict: Server) -> None:
    """RATE_LOGIN_IDENTIFIER=3/600: after three wrong passwords on DELETE /auth/me, further
    attempts are 401 invalid_credentials even with the right password; the account stays."""
    email, password = new_account(strict)
    browser = signed_in(strict, email, password)
    user_id = user_id_of(strict, email)
    for _ in range(3):
        answer = delete_me(browser, {"password": strong_password()})
        assert answer.status == 401 and answer.json() == INVALID_CREDENTIALS, answer
    for _ in range(2):
        answer = delete_me(browser, {"password": password})
        assert answer.status == 401 and answer.json() == INVALID_CREDENTIALS, answer
    assert browser.me().json()["user"]["email"] == email
    assert user_id_of(strict, email) == user_id
    assert tombstones(strict, user_id) == []


def test_deletion_mails_the_address(server: Server, mail: MailSink) -> None:
    """The mail "account_deleted" reaches the deleted account's address, and only it."""
    email, password = new_account(server)
    browser = signed_in(server, email, password)
    assert delete_me(browser, {"password": password}).status == 200
    received = wait_mail(mail, email, DELETED_SUBJECT)
    assert received.rcpt_tos == [email], received.rcpt_tos
    assert received.message["To"] == email
    assert email in received.text()


# -- GET /auth/me/export ---------------------------------------------------------------------


def test_export_without_a_session_is_401(server: Server) -> None:
    """No session, or a made-up one: 401 unauthorized."""
    assert export(server.client()).json() == UNAUTHORIZED
    answer = export(replay(server, "B" * 43))
    assert answer.status == 401 and answer.json() == UNAUTHORIZED, answer


def test_export_holds_everything_about_the_caller_and_nothing_else(
    server: Server, mail: MailSink
) -> None:
    """Profile, both sessions (by their public ids), the pending link (never its token),
    the audit events, the chat round and usage; nothing of a second user, no password
    hash, no cookie value or its hash."""
    email, password = new_account(server)
    laptop = signed_in(server, email, password, "export-laptop")
    phone_browser = signed_in(server, email, password, "export-phone")
    other_email, other_password = new_account(server)
    other = signed_in(server, other_email, other_password, "export-other")
    chat_round(other, "the other user's words")
    name = f"Exporter {random_hex(4)}"
    _, formatted = random_phone()
    patched = laptop.request(
        "PATCH", "/auth/me", json_body={"display_name": name, "phone": formatted}
    )
    assert patched.status == 200, patched
    me = patched.json()["user"]
    new_email = random_email()
    change = laptop.post("/auth/email/change", {"password": password, "new_email": new_email})
    assert change.status == 200, change
    token_match = CHANGE_LINK_RE.search(wait_mail(mail, new_email, "/verify_email?token=").text())
    assert token_match is not None
    change_token = token_match.group(1)
    message = f"what I said {random_hex(4)}"
    echoed = chat_round(laptop, message)
    listed = laptop.get("/auth/sessions").json()["sessions"]
    other_ids = [s["id"] for s in other.get("/auth/sessions").json()["sessions"]]

    answer = export(phone_browser)
    assert answer.status == 200, answer
    assert (answer.header("Content-Type") or "").startswith("application/json"), answer.headers
    disposition = answer.header("Content-Disposition") or ""
    assert disposition.startswith("attachment"), disposition
    assert 'filename="cloudchat-export.json"' in disposition, disposition
    data = answer.json()
    text = answer.body.decode("utf-8")
    assert data["ok"] is True and data["exported_at"].endswith("Z"), data

    profile = data["profile"]
    assert profile["email"] == email and profile["uid"] == me["uid"], profile
    assert profile["phone"] == me["phone"] and profile["display_name"] == name, profile
    assert profile["email_verified_at"] is None and profile["mfa_enabled"] is False, profile
    assert profile["created_at"].endswith("Z"), profile
    assert profile.get("is_active", True) is True, profile

    sessions = data["sessions"]
    assert {s["id"] for s in sessions} == {s["id"] for s in listed}, (sessions, listed)
    assert len(sessions) == 2, sessions
    assert {s["user_agent"] for s in sessions} == {"export-laptop", "export-phone"}, sessions
    for session in sessions:
        assert {"created_at", "last_seen_at", "expires_at", "revoked_at", "ip"} <= set(session)
        assert session["revoked_at"] is None, session

    assert len(data["email_links"]) == 1, data["email_links"]
    (link,) = data["email_links"]
    assert link["purpose"] == "change" and link["email"] == new_email, link
    assert not any("token" in key for key in link), link

    events = data["events"]
    names = [e["event"] for e in events]
    for expected in ("register", "login_ok", "profile_updated", "email_change_requested"):
        assert expected in names, names
    assert names.count("login_ok") == 2, names
    assert names[0] == "register", names
    login_details = {e["detail"] for e in events if e["event"] == "login_ok"}
    assert login_details == {f"session={s['id']}" for s in listed}, (login_details, listed)
    for event in events:
        assert {"at", "event", "detail", "ip", "user_agent", "request_id"} <= set(event), event

    assert data["chat_history"] == [
        {"role": "user", "content": message},
        {"role": "assistant", "content": echoed},
    ], data["chat_history"]
    # The one chat round, with the offline echo provider (no usage report: estimated).
    (usage,) = data["usage"]
    assert usage["provider"] == usage["model"] == "echo", usage
    assert usage["requests"] == 1 and usage["estimated"] == 1, usage
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0, usage

    forbidden = [
        other_email,
        *other_ids,
        "the other user's words",
        "$argon2",
        change_token,
        sha256(change_token),
        password,
    ]
    for browser in (laptop, phone_browser, other):
        for cookie in browser.cookies.values():
            forbidden += [cookie, sha256(cookie)]
    for value in forbidden:
        assert value not in text, f"the export holds {value!r}"


def test_export_is_rate_limited_per_account(strict: Server) -> None:
    """RATE_ACCOUNT=2/60: a third export within the minute is 429 rate_limited with
    Retry-After, from any device of the account; another account is not affected."""
    email, password = new_account(strict)
    laptop = signed_in(strict, email, password, "limited-laptop")
    phone_browser = signed_in(strict, email, password, "limited-phone")
    for _ in range(2):
        assert export(laptop).status == 200
    limited = export(laptop)
    assert_error(limited, 429, "rate_limited")
    assert int(limited.header("Retry-After") or 0) > 0, limited.headers
    assert_error(export(phone_browser), 429, "rate_limited")
    other = signed_in(strict, *new_account(strict))
    assert export(other).status == 200
