"""Issue 15: the operator's commands, the audit log and the cleanup job, on real servers.

Every command runs as `python cloudchat.py COMMAND` with the server's own environment, in
both setups (embedded SQLite, PostgreSQL with Redis) unless a point belongs to one only.
The two pure helpers of the command line (parse_since, format_event) are tested in process.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cloudchat
from tests.conftest import SETUPS, PgDatabases, ServerFactory, shared_server
from tests.helpers import (
    HIGH_LIMITS,
    INVALID_CREDENTIALS,
    ROOT,
    UNAUTHORIZED,
    Client,
    Server,
    assert_error,
    base_env,
    logged,
    random_email,
    random_hex,
    register_and_login,
    run_cli,
    sql_rows,
    strong_password,
    wait_until,
)
from tests.mailsink import TOKEN_RE, MailSink

FRONTEND = "http://cc-frontend.test:5000"
SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f+00:00"  # how the embedded store keeps times
EVENT_FIELDS = {"at", "user_id", "event", "detail", "ip", "user_agent", "request_id"}
COMMANDS = (
    "users",
    "user",
    "logout-user",
    "delete-user",
    "export-user",
    "reset-link",
    "unlock",
    "verify-email",
    "audit",
    "cleanup",
    "deactivate",
    "activate",
    "initdb",
    "check-config",
)
HIGH = "100000/3600"
# The module's shared server: limits out of the way, mail to the sink, no cleanup job of
# its own (the tests run `cleanup` and count what it deletes), verification optional (so
# that an unverified account can hold a live, cached session).
ADMIN_SETTINGS = {
    **HIGH_LIMITS,
    "RATE_FORGOT_IP": HIGH,
    "RATE_FORGOT_IDENTIFIER": HIGH,
    "RATE_TOKEN_IP": HIGH,
    "CLEANUP_INTERVAL_SECONDS": "0",
    "EMAIL_VERIFICATION": "optional",
    "FRONTEND_BASE_URL": FRONTEND,
}
# Low login limits; every login on this server but the address-unlock test's comes from its
# own X-Forwarded-For address (127.0.0.1 is a trusted proxy by default).
LOGIN_IDENTIFIER_LIMIT = 3
LOGIN_IP_LIMIT = 5
LIMITED_SETTINGS = {
    **HIGH_LIMITS,
    "RATE_LOGIN_IDENTIFIER": f"{LOGIN_IDENTIFIER_LIMIT}/600",
    "RATE_LOGIN_IP": f"{LOGIN_IP_LIMIT}/600",
    "CLEANUP_INTERVAL_SECONDS": "0",
}


@pytest.fixture(scope="module", params=SETUPS)
def admin(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sink: MailSink
) -> Iterator[Server]:
    """The module's server, once per setup, mailing to the module's SMTP sink."""
    yield from shared_server(request, tmp_path_factory, {**ADMIN_SETTINGS, **sink.env()})


@pytest.fixture(scope="module", params=SETUPS)
def limited(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server with low login limits, once per setup."""
    yield from shared_server(request, tmp_path_factory, LIMITED_SETTINGS)


# -- helpers ---------------------------------------------------------------------------------


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one command with the server's environment and work directory."""
    return run_cli(list(args), server.env, server.workdir)


def ok(server: Server, *args: str) -> str:
    """Run a command that must succeed; its stdout."""
    done = cli(server, *args)
    assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def fails(server: Server, *args: str, code: int = 1) -> str:
    """Run a command that must fail with `code` and a 'cloudchat: ' reason as its last line
    (log lines, on stderr too, may come before it); its stderr."""
    done = cli(server, *args)
    assert done.returncode == code, (args, done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith("cloudchat: "), done.stderr
    return done.stderr


def account_id(server: Server, email: str) -> int:
    """The id of the account with this address."""
    (row,) = sql_rows(server, "SELECT id FROM users WHERE email = %s", (email,))
    return int(row["id"])


def audit_json(server: Server, *args: str) -> list[dict[str, Any]]:
    """`audit ARGS --json`, each line decoded."""
    out = ok(server, "audit", *args, "--json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def ago(**delta: float) -> dt.datetime:
    """Now minus a span, in UTC."""
    return dt.datetime.now(dt.UTC) - dt.timedelta(**delta)


def ahead(**delta: float) -> dt.datetime:
    """Now plus a span, in UTC."""
    return dt.datetime.now(dt.UTC) + dt.timedelta(**delta)


def stamp(server: Server, when: dt.datetime | None) -> Any:
    """A time as the server's database keeps it: timestamptz, or SQLite's sortable text."""
    if when is None or server.env.get("DATABASE_URL"):
        return when
    return when.astimezone(dt.UTC).strftime(SQLITE_TIME_FORMAT)


def sha(text: str) -> str:
    """SHA-256 in hex, as the server stores tokens."""
    return hashlib.sha256(text.encode()).hexdigest()


def fresh_hash() -> str:
    """A random 64-hex-digit key for a hand-made session or link row."""
    return secrets.token_hex(32)


def insert_session(
    server: Server,
    user: int,
    *,
    created: dt.datetime,
    expires: dt.datetime,
    seen: dt.datetime | None = None,
    revoked: dt.datetime | None = None,
) -> str:
    """A hand-made session row; its id_hash."""
    id_hash = fresh_hash()
    sql_rows(
        server,
        "INSERT INTO sessions (id_hash, user_id, created_at, expires_at, last_seen_at, revoked_at)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (
            id_hash,
            user,
            stamp(server, created),
            stamp(server, expires),
            stamp(server, seen),
            stamp(server, revoked),
        ),
    )
    return id_hash


def insert_event(server: Server, user: int | None, when: dt.datetime, detail: str) -> None:
    """A hand-made audit row at a given time."""
    sql_rows(
        server,
        "INSERT INTO auth_events (created_at, user_id, event, detail, ip, user_agent, request_id)"
        " VALUES (%s, %s, 'login_ok', %s, '', '', '')",
        (stamp(server, when), user, detail),
    )


def surviving(server: Server, table: str, key: str, keys: list[Any]) -> set[Any]:
    """Which of these keys are still in the table."""
    marks = ", ".join(["%s"] * len(keys))
    rows = sql_rows(server, f"SELECT {key} FROM {table} WHERE {key} IN ({marks})", keys)
    return {row[key] for row in rows}


def cached_session(server: Server, client: Client) -> str | None:
    """What Redis holds for the client's session (PostgreSQL setup only)."""
    import redis

    key = server.env["REDIS_KEY_PREFIX"] + "sess:" + sha(client.cookies["cc_auth"])
    conn = redis.Redis.from_url(server.env["REDIS_URL"], decode_responses=True)
    try:
        return conn.get(key)
    finally:
        conn.close()


def assert_cached(server: Server, client: Client) -> None:
    """With Redis, the client's session is in the cache (so a later check proves the
    command reached the cache, not only SQL)."""
    if server.setup == "postgres":
        value = cached_session(server, client)
        assert value is not None and value != "revoked", value


def random_address() -> str:
    """A fresh client address, sent as X-Forwarded-For by a trusted local proxy."""
    return "10." + ".".join(str(secrets.randbelow(254) + 1) for _ in range(3))


def from_address(server: Server, address: str | None = None) -> Client:
    """A client whose requests count as coming from `address` (a fresh one by default)."""
    return server.client({"X-Forwarded-For": address or random_address()})


def event_names(rows: list[dict[str, Any]]) -> list[str]:
    """The events of audit rows, in order."""
    return [row["event"] for row in rows]


def all_audit_text(server: Server) -> str:
    """Every value of every audit row, as one string (to look for secrets in it)."""
    rows = sql_rows(server, "SELECT * FROM auth_events")
    return "\n".join(" ".join(str(value) for value in row.values()) for row in rows)


# -- the pure helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 7 * 86400), ("12h", 12 * 3600), ("30m", 1800), ("90s", 90), (" 1d ", 86400)],
)
def test_parse_since_reads_a_span(text: str, seconds: int) -> None:
    """'7d', '12h', '30m', '90s' are time spans."""
    assert cloudchat.parse_since(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7", "7w", "-1d", "1.5h", "d", "7 d", "7dd", "1e3s"])
def test_parse_since_refuses_anything_else(text: str) -> None:
    """Anything but digits and one unit is a ValueError."""
    with pytest.raises(ValueError, match="time span"):
        cloudchat.parse_since(text)


def test_format_event_shows_every_field() -> None:
    """One line: time (ISO, UTC, Z), account, event, address, detail, request id, agent."""
    at = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    row = (at, 42, "login_ok", "session=abc", "203.0.113.9", "curl/8.0", "rid-1")
    line = cloudchat.format_event(row)
    assert line == (
        "2024-01-02T03:04:05Z  user 42  login_ok  203.0.113.9  session=abc  rid=rid-1"
        "  ua='curl/8.0'"
    )
    assert "\n" not in line


def test_format_event_of_an_unknown_account_and_a_command() -> None:
    """No account and no address show as '-'; empty parts are left out; SQLite's text time
    and a PostgreSQL datetime give the same line."""
    row = ("2024-01-02 03:04:05.000000+00:00", None, "login_failed", "reason=unknown_account")
    line = cloudchat.format_event((*row, "", "", ""))
    assert line == "2024-01-02T03:04:05Z  -  login_failed  -  reason=unknown_account"
    at = dt.datetime(2024, 1, 2, 4, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert cloudchat.format_event((at, *row[1:], "", "", "")) == line
    admin_row = (at, 7, "logout", "", "", "cloudchat.py logout-user", "")
    assert cloudchat.format_event(admin_row) == (
        "2024-01-02T03:04:05Z  user 7  logout  -  ua='cloudchat.py logout-user'"
    )


# -- the command line ------------------------------------------------------------------------


def test_help_lists_every_command(tmp_path: Path) -> None:
    """`--help` exits 0 and names every command."""
    done = run_cli(["--help"], base_env(), tmp_path)
    assert done.returncode == 0, done.stderr
    for name in COMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s", done.stdout, re.MULTILINE), (
            name,
            done.stdout,
        )


def test_a_bad_since_is_refused(admin: Server) -> None:
    """`audit --since 7w` is a usage error (exit 2) with a reason, not a traceback."""
    done = cli(admin, "audit", "--since", "7w")
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert "7w" in done.stderr and done.stdout == ""


@pytest.mark.parametrize(
    "command", ["user", "logout-user", "delete-user", "export-user", "reset-link", "verify-email"]
)
def test_an_unknown_account_is_named(admin: Server, command: str) -> None:
    """Each command on an address without an account: exit 1, 'no account', nothing done."""
    email = random_email()
    stderr = fails(admin, command, email)
    assert "no account" in stderr and email in stderr


@pytest.mark.parametrize("command", ["user", "logout-user", "delete-user", "export-user"])
def test_a_non_address_is_refused(admin: Server, command: str) -> None:
    """An argument that is no email address: exit 1 saying so."""
    stderr = fails(admin, command, "not-an-address")
    assert "not an email address" in stderr


def test_users_search_finds_part_of_an_address(admin: Server) -> None:
    """users --search: part of an email, any case; tab-separated lines, newest first;
    --limit bounds the lines."""
    mark = random_hex(4)
    first, second = f"a{mark}-one@example.com", f"b{mark}-two@example.com"
    for email in (first, second):
        assert admin.client().register(email, strong_password()).status == 201
    assert admin.client().register(random_email(), strong_password()).status == 201
    lines = ok(admin, "users", "--search", mark.upper()).splitlines()
    assert len(lines) == 2, lines
    rows = [line.split("\t") for line in lines]
    assert [row[1] for row in rows] == [second, first]
    for row, email in zip(rows, (second, first), strict=True):
        assert len(row) == 6, row
        assert int(row[0]) == account_id(admin, email)
        assert row[2:5] == ["-", "-", "-"], row  # no phone, no name, active and unverified
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", row[5]), row
    limited_lines = ok(admin, "users", "--search", mark, "--limit", "1").splitlines()
    assert [line.split("\t")[1] for line in limited_lines] == [second]
    assert len(ok(admin, "users", "--limit", "2").splitlines()) == 2


def test_users_search_takes_percent_and_underscore_literally(admin: Server) -> None:
    """'%' and '_' in the search are characters to find, not LIKE wildcards."""
    mark = random_hex(4)
    percent, near_percent = f"p{mark}a%b@example.com", f"p{mark}axb@example.com"
    under, near_under = f"q{mark}a_b@example.com", f"q{mark}ayb@example.com"
    for email in (percent, near_percent, under, near_under):
        assert admin.client().register(email, strong_password()).status == 201, email
    found = ok(admin, "users", "--search", f"{mark}a%b").splitlines()
    assert [line.split("\t")[1] for line in found] == [percent]
    found = ok(admin, "users", "--search", f"{mark}a_b").splitlines()
    assert [line.split("\t")[1] for line in found] == [under]
    found = ok(admin, "users", "--search", f"{mark}a").splitlines()
    assert len(found) == 4
    assert ok(admin, "users", "--search", f"{mark}%").strip() == ""


def test_users_search_finds_a_display_name(admin: Server) -> None:
    """The search covers the display name too, case-insensitively; flags show."""
    mark = random_hex(4)
    email = random_email()
    response = admin.client().register(email, strong_password(), display_name=f"Zed {mark}X")
    assert response.status == 201
    ok(admin, "verify-email", email)
    (line,) = ok(admin, "users", "--search", f"ZED {mark.upper()}x").splitlines()
    assert line.split("\t")[1:5] == [email, "-", f"Zed {mark}X", "verified"]
    ok(admin, "deactivate", email)
    (line,) = ok(admin, "users", "--search", email).splitlines()
    assert line.split("\t")[4] == "inactive,verified"


def test_user_shows_profile_live_sessions_and_events(admin: Server) -> None:
    """user EMAIL: the profile, the live sessions (an ended one not counted), events."""
    first, email, password = register_and_login(admin, display_name="Ada")
    second, third = admin.client(), admin.client()
    assert second.login(email, password).status == 200
    assert third.login(email, password).status == 200
    assert third.post("/auth/logout", {}).status == 200
    out = ok(admin, "user", email.upper())
    user = account_id(admin, email)
    assert out.startswith(f"account {user} (")
    assert f"  email: {email}\n" in out
    assert "  display_name: Ada\n" in out
    assert "  is_active: True\n" in out
    assert "  email_verified_at: None\n" in out
    assert "live sessions: 2\n" in out
    sessions = out.split("live sessions: 2\n", 1)[1].split("latest events:", 1)[0]
    for client in (first, second):
        public = cloudchat.session_public_id(sha(client.cookies["cc_auth"]))
        assert public in sessions, (public, out)
    events = out.split("latest events:", 1)[1].splitlines()[1:]
    assert [line.split()[3] for line in events] == [
        "register",
        "verification_sent",
        "login_ok",
        "login_ok",
        "login_ok",
        "logout",
    ], out
    assert all(f"user {user}" in line for line in events)
    assert password not in out
    for client in (first, second):
        assert client.cookies["cc_auth"] not in out


def test_logout_user_ends_every_session_at_once(admin: Server) -> None:
    """logout-user: each session of the account is 401 at once (with Redis, cached ones
    too); another account's session goes on; the account can log in again; audited."""
    first, email, password = register_and_login(admin)
    second = admin.client()
    assert second.login(email, password).status == 200
    other, _, _ = register_and_login(admin)
    for client in (first, second, other):
        assert client.me().status == 200
        assert_cached(admin, client)
    user = account_id(admin, email)
    out = ok(admin, "logout-user", email)
    assert out.strip() == f"account {user}: 2 live session(s) ended"
    for client in (first, second):
        response = client.me()
        assert response.status == 401, response
        assert response.json() == UNAUTHORIZED
    assert other.me().status == 200
    assert admin.client().login(email, password).status == 200
    (row,) = [r for r in audit_json(admin, email) if r["event"] == "logout"]
    assert row["user_id"] == user
    assert row["ip"] == "" and row["user_agent"] == "cloudchat.py logout-user"
    assert row["request_id"] == ""
    detail = row["detail"].split()
    assert "by=admin" in detail and "scope=global" in detail, row
    # The spec's logout event detail: scope=.. revoked_sessions=.. (as a user's own logout).
    assert "revoked_sessions=2" in detail, row


def test_delete_user_removes_the_account(admin: Server) -> None:
    """delete-user: the account is gone (login 401, its cached session 401), its rows
    too; one account_deleted tombstone stays (user_id NULL, detail user=<id> by=admin);
    others are untouched."""
    client, email, password = register_and_login(admin)
    assert client.me().status == 200
    assert_cached(admin, client)
    other, other_email, _ = register_and_login(admin)
    user = account_id(admin, email)
    assert ok(admin, "delete-user", email).strip() == f"account {user} deleted"
    assert client.me().json() == UNAUTHORIZED
    response = admin.client().login(email, password)
    assert response.status == 401
    assert response.json() == INVALID_CREDENTIALS
    assert sql_rows(admin, "SELECT id FROM users WHERE email = %s", (email,)) == []
    for table in ("credentials", "sessions", "password_resets", "email_tokens"):
        rows = sql_rows(admin, f"SELECT user_id FROM {table} WHERE user_id = %s", (user,))
        assert rows == [], table
    assert sql_rows(admin, "SELECT id FROM auth_events WHERE user_id = %s", (user,)) == []
    (tomb,) = sql_rows(
        admin,
        "SELECT user_id, event, detail, ip, user_agent, request_id FROM auth_events"
        " WHERE detail LIKE %s",
        (f"user={user} %",),
    )
    assert tomb == {
        "user_id": None,  # the foreign key: the account's id lives on in the detail only
        "event": "account_deleted",
        "detail": f"user={user} by=admin",
        "ip": "",
        "user_agent": "cloudchat.py delete-user",
        "request_id": "",
    }
    assert "no account" in fails(admin, "user", email)
    assert other.me().status == 200
    assert account_id(admin, other_email) != user
    assert admin.client().register(email, strong_password()).status == 201  # address free


def test_export_user_prints_everything_as_json(admin: Server) -> None:
    """export-user: the /auth/me/export document without "ok": profile, sessions (with
    ended ones), links without tokens, events."""
    first, email, password = register_and_login(admin, display_name="Exporter")
    second = admin.client()
    assert second.login(email, password).status == 200
    assert second.post("/auth/logout", {}).status == 200
    out = ok(admin, "export-user", email)
    export = json.loads(out)
    assert set(export) == {
        "exported_at",
        "profile",
        "sessions",
        "email_links",
        "events",
        "events_truncated",
        "chat_history",
        "usage",
    }
    assert export["events_truncated"] is False
    profile = export["profile"]
    assert profile["email"] == email
    assert profile["display_name"] == "Exporter"
    assert profile["is_active"] is True
    assert profile["email_verified_at"] is None
    assert profile["mfa_enabled"] is False
    over_http = first.get("/auth/me/export")
    assert over_http.status == 200, over_http
    assert over_http.json()["profile"] == profile
    sessions = export["sessions"]
    assert len(sessions) == 2
    ids = {cloudchat.session_public_id(sha(first.cookies["cc_auth"]))}
    assert ids < {s["id"] for s in sessions}
    assert sorted(s["revoked_at"] is None for s in sessions) == [False, True]
    for session in sessions:
        assert set(session) == {
            "id",
            "created_at",
            "last_seen_at",
            "expires_at",
            "revoked_at",
            "user_agent",
            "ip",
        }
    (link,) = export["email_links"]
    assert link["purpose"] == "verify" and link["email"] == email
    assert set(link) == {"purpose", "email", "created_at", "expires_at"}
    assert event_names(export["events"])[:2] == ["register", "verification_sent"]
    assert "login_ok" in event_names(export["events"])
    assert first.cookies["cc_auth"] not in out and password not in out


def test_reset_link_replaces_the_mailed_one(admin: Server, mail: MailSink) -> None:
    """reset-link prints a link whose token works once; the link mailed before it stops
    working; audited as reset_link_issued by=admin; no token in the audit log."""
    client, email, password = register_and_login(admin)
    assert admin.client().post("/auth/password/forgot", {"identifier": email}).status == 200

    def mailed_token() -> str | None:
        for message in mail.to(email):
            match = TOKEN_RE.search(message.text())
            if match:
                return match.group(1)
        return None

    mailed = wait_until(mailed_token, 10, what="the reset mail")
    user = account_id(admin, email)
    wait_until(
        lambda: sql_rows(
            admin,
            "SELECT 1 FROM auth_events WHERE user_id = %s AND event = 'reset_link_sent'",
            (user,),
        ),
        10,
        what="the reset_link_sent event",
    )
    done = cli(admin, "reset-link", email)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip()
    assert link.startswith(f"{FRONTEND}/reset_password?token="), link
    match = TOKEN_RE.search(link)
    assert match and link.endswith(match.group(1))
    printed = match.group(1)
    assert printed != mailed
    assert "valid until" in done.stderr and printed not in done.stderr
    old = admin.client().post(
        "/auth/password/reset", {"token": mailed, "password": strong_password()}
    )
    assert_error(old, 400, "invalid_token")
    new_password = strong_password()
    used = admin.client().post("/auth/password/reset", {"token": printed, "password": new_password})
    assert used.status == 200, used
    again = admin.client().post(
        "/auth/password/reset", {"token": printed, "password": strong_password()}
    )
    assert_error(again, 400, "invalid_token")
    assert admin.client().login(email, password).status == 401
    assert admin.client().login(email, new_password).status == 200
    rows = audit_json(admin, email)
    (issued,) = [r for r in rows if r["event"] == "reset_link_issued"]
    assert issued["detail"] == "by=admin"
    assert issued["user_agent"] == "cloudchat.py reset-link" and issued["ip"] == ""
    names = event_names(rows)
    assert names.index("reset_link_sent") < names.index("reset_link_issued")
    assert names.index("reset_link_issued") < names.index("password_reset")
    text = all_audit_text(admin)
    for secret in (mailed, printed, client.cookies["cc_auth"], password, new_password):
        assert secret not in text
        assert sha(secret) not in text


def test_reset_link_refuses_an_inactive_account(admin: Server) -> None:
    """reset-link for a deactivated account: exit 1, no link printed or stored."""
    _, email, _ = register_and_login(admin)
    ok(admin, "deactivate", email)
    done = cli(admin, "reset-link", email)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert "inactive" in done.stderr
    user = account_id(admin, email)
    assert sql_rows(admin, "SELECT 1 FROM password_resets WHERE user_id = %s", (user,)) == []
    events = event_names(audit_json(admin, email))
    assert "reset_link_issued" not in events and events[-1] == "deactivated"


def test_deactivate_and_activate_are_audited(admin: Server) -> None:
    """deactivate/activate leave their events, by=admin, from the command line."""
    client, email, _ = register_and_login(admin)
    ok(admin, "deactivate", email)
    ok(admin, "activate", email)
    rows = [r for r in audit_json(admin, email) if r["event"] in ("deactivated", "activated")]
    assert event_names(rows) == ["deactivated", "activated"]
    assert "by=admin" in rows[0]["detail"].split()
    assert "revoked_sessions=1" in rows[0]["detail"].split()
    assert rows[0]["user_agent"] == "cloudchat.py deactivate"
    assert rows[1]["user_agent"] == "cloudchat.py activate"
    assert client.me().status == 401


# -- verification ----------------------------------------------------------------------------


@pytest.mark.parametrize("setup", SETUPS)
def test_verify_email_lets_a_required_login_in(make_server: ServerFactory, setup: str) -> None:
    """EMAIL_VERIFICATION=required: 403 email_not_verified before verify-email, 200 after,
    and /auth/me says email_verified."""
    server = make_server.start(setup, {**HIGH_LIMITS, "EMAIL_VERIFICATION": "required"})
    email, password = random_email(), strong_password()
    client = server.client()
    assert client.register(email, password).status == 201
    assert_error(client.login(email, "wrong-" + password), 401, "invalid_credentials")
    assert_error(client.login(email, password), 403, "email_not_verified")
    user = account_id(server, email)
    assert ok(server, "verify-email", email).strip() == f"account {user}: email address verified"
    assert client.login(email, password).status == 200
    me = client.me()
    assert me.status == 200
    assert me.json()["user"]["email_verified"] is True
    verified = [r for r in audit_json(server, email) if r["event"] == "email_verified"]
    assert len(verified) == 1 and verified[0]["detail"] == "by=admin"
    assert verified[0]["user_agent"] == "cloudchat.py verify-email"
    failed = [r["detail"] for r in audit_json(server, email) if r["event"] == "login_failed"]
    assert failed == ["reason=password", "reason=email_not_verified"]


def test_verify_email_reaches_a_live_cached_session(admin: Server) -> None:
    """EMAIL_VERIFICATION=optional: a session open before verify-email (with Redis, in the
    cache) shows email_verified true at once."""
    client, email, _ = register_and_login(admin)
    me = client.me()
    assert me.json()["user"]["email_verified"] is False
    assert_cached(admin, client)
    ok(admin, "verify-email", email)
    me = client.me()
    assert me.status == 200
    assert me.json()["user"]["email_verified"] is True
    if admin.setup == "postgres":
        assert json.loads(cached_session(admin, client) or "{}").get("email_verified") is True
    (row,) = sql_rows(admin, "SELECT email_verified_at FROM users WHERE email = %s", (email,))
    assert row["email_verified_at"] is not None


# -- the audit log ---------------------------------------------------------------------------


def test_audit_json_of_a_login_flow(admin: Server) -> None:
    """audit EMAIL --json: one object a line with the seven fields, oldest first: the
    flow's events in order, each with the request's address, agent and request id."""
    agent = f"admin-test/{random_hex(2)}"
    client = admin.client({"User-Agent": agent})
    email, password = random_email(), strong_password()
    registered = client.register(email, password)
    assert registered.status == 201
    failed = client.login(email, "wrong-" + password)
    assert failed.status == 401
    login = client.login(email, password)
    assert login.status == 200
    rid = login.header("X-Request-ID")
    assert rid
    assert client.me().status == 200
    logout = client.post("/auth/logout", {})
    assert logout.status == 200
    rows = audit_json(admin, email)
    user = account_id(admin, email)
    for row in rows:
        assert set(row) == EVENT_FIELDS, row
        assert row["user_id"] == user
        assert row["ip"] == "127.0.0.1" and row["user_agent"] == agent
    assert event_names(rows) == [
        "register",
        "verification_sent",
        "login_failed",
        "login_ok",
        "logout",
    ]
    times = [dt.datetime.fromisoformat(row["at"].replace("Z", "+00:00")) for row in rows]
    assert times == sorted(times)
    assert all(row["at"].endswith("Z") for row in rows)
    by_event = {row["event"]: row for row in rows}
    assert by_event["register"]["request_id"] == registered.header("X-Request-ID")
    assert by_event["login_failed"]["detail"] == "reason=password"
    assert by_event["login_failed"]["request_id"] == failed.header("X-Request-ID")
    public = cloudchat.session_public_id(sha(client_cookie(login)))
    assert by_event["login_ok"]["detail"] == f"session={public}"
    assert by_event["login_ok"]["request_id"] == rid
    assert by_event["logout"]["request_id"] == logout.header("X-Request-ID")
    assert set(by_event["logout"]["detail"].split()) == {"scope=local", "revoked_sessions=1"}
    text = ok(admin, "audit", email).splitlines()
    assert len(text) == len(rows)
    assert [line.split()[3] for line in text] == event_names(rows)
    assert f"rid={rid}" in text[3]
    text_all = all_audit_text(admin)
    assert password not in text_all and client_cookie(login) not in text_all


def client_cookie(response: Any) -> str:
    """The session id a login response set."""
    cookie = response.cookie("cc_auth")
    assert cookie is not None, response
    return cookie[0]


def test_audit_records_a_failed_login_of_no_account(admin: Server) -> None:
    """A login for an unknown address: login_failed with user_id null, the request's id;
    neither the address nor the password kept."""
    email, password = random_email(), strong_password()
    response = admin.client().login(email, password)
    assert response.status == 401
    rid = response.header("X-Request-ID")
    rows = [r for r in audit_json(admin, "--since", "1h") if r["request_id"] == rid]
    assert len(rows) == 1, rows
    (row,) = rows
    assert row["user_id"] is None
    assert row["event"] == "login_failed"
    assert row["detail"] == "reason=unknown_account"
    assert row["ip"] == "127.0.0.1"
    text = all_audit_text(admin)
    assert email not in text and password not in text


def test_audit_since_and_limit(admin: Server) -> None:
    """--since 7d leaves out a row from 10 days ago, --since 30d shows it (first, being
    the oldest); --limit N gives the newest N, oldest first."""
    _, email, _ = register_and_login(admin)
    user = account_id(admin, email)
    marker = f"marker={random_hex(4)}"
    insert_event(admin, user, ago(days=10), marker)
    recent = audit_json(admin, email, "--since", "7d")
    assert marker not in [r["detail"] for r in recent]
    assert event_names(recent) == ["register", "verification_sent", "login_ok"]
    default = audit_json(admin, email)
    assert default == recent  # the default is 7d
    month = audit_json(admin, email, "--since", "30d")
    assert month[0]["detail"] == marker
    assert month[1:] == recent
    assert audit_json(admin, email, "--since", "30d", "--limit", "2") == recent[-2:]
    assert audit_json(admin, email, "--since", "1h") == recent


@pytest.mark.parametrize("account", ["unknown", "known"])
def test_a_login_flood_is_recorded_once(limited: Server, account: str) -> None:
    """Logins refused by a limit leave one login_limited row per address and account in a
    window, however many attempts follow."""
    address = random_address()
    client = from_address(limited, address)
    attempts = 12
    if account == "known":
        email, password = random_email(), strong_password()
        assert limited.client().register(email, password).status == 201
        user: int | None = account_id(limited, email)
        statuses = [client.login(email, "wrong-" + password).status for _ in range(attempts)]
        allowed = LOGIN_IDENTIFIER_LIMIT
    else:
        email, user = random_email(), None
        statuses = [client.login(email, strong_password()).status for _ in range(attempts)]
        allowed = LOGIN_IP_LIMIT
    assert statuses == [401] * attempts
    rows = sql_rows(
        limited,
        "SELECT event, user_id, detail FROM auth_events WHERE ip = %s ORDER BY id",
        (address,),
    )
    assert [r["event"] for r in rows] == ["login_failed"] * allowed + ["login_limited"], rows
    assert all(r["user_id"] == user for r in rows)


def test_unlock_account(limited: Server) -> None:
    """With Redis, `unlock EMAIL` lets an account whose login limit is used up in at once
    (the right password was refused); embedded, it says the counters live in the server."""
    email, password = random_email(), strong_password()
    assert limited.client().register(email, password).status == 201
    if limited.setup == "embedded":
        stderr = fails(limited, "unlock", email)
        assert "server process" in stderr
        return
    for _ in range(LOGIN_IDENTIFIER_LIMIT):
        assert from_address(limited).login(email, "wrong-" + password).status == 401
    refused = from_address(limited).login(email, password)
    assert refused.status == 401 and refused.json() == INVALID_CREDENTIALS
    out = ok(limited, "unlock", email.upper())
    user = account_id(limited, email)
    assert out.startswith(f"account {user}: "), out
    assert from_address(limited).login(email, password).status == 200
    (row,) = [r for r in audit_json(limited, email) if r["event"] == "unlocked"]
    assert row["detail"] == "by=admin" and row["user_agent"] == "cloudchat.py unlock"


def test_unlock_address(limited: Server) -> None:
    """With Redis, `unlock 127.0.0.1` lets logins from an address whose login limit is used
    up in again; embedded, exit 1 saying the counters live in the server process."""
    email, password = random_email(), strong_password()
    assert limited.client().register(email, password).status == 201
    if limited.setup == "embedded":
        stderr = fails(limited, "unlock", "127.0.0.1")
        assert "server process" in stderr
        return
    local = limited.client()  # no X-Forwarded-For: 127.0.0.1 itself
    for _ in range(LOGIN_IP_LIMIT):
        assert local.login(random_email(), strong_password()).status == 401
    try:
        refused = local.login(email, password)
        assert refused.status == 401 and refused.json() == INVALID_CREDENTIALS
        assert from_address(limited).login(email, password).status == 200  # only 127.0.0.1
    finally:
        out = ok(limited, "unlock", "127.0.0.1")
    assert out.startswith("address 127.0.0.1: "), out
    assert local.login(email, password).status == 200
    rows = [
        r
        for r in audit_json(limited, "--since", "1h")
        if r["event"] == "unlocked" and r["user_id"] is None
    ]
    assert rows and rows[-1]["detail"] == "by=admin"


def test_unlock_of_nothing_known(limited: Server) -> None:
    """unlock with neither an account nor an address: exit 1 (with Redis: no account)."""
    stderr = fails(limited, "unlock", random_email())
    if limited.setup == "postgres":
        assert "no account" in stderr


# -- cleanup ---------------------------------------------------------------------------------


def cleanup_counts(out: str) -> dict[str, int]:
    """'N sessions, N password_resets, N email_tokens, N auth_events, N chat_usage deleted'
    as a dict."""
    # stdout is the result alone: a command's log goes to stderr.
    names = ("sessions", "password_resets", "email_tokens", "auth_events", "chat_usage")
    match = re.fullmatch(", ".join(rf"(\d+) {name}" for name in names) + " deleted", out.strip())
    assert match, out
    return dict(zip(names, map(int, match.groups()), strict=True))


def test_cleanup_deletes_exactly_the_dead_rows(admin: Server) -> None:
    """cleanup: expired, revoked and idle sessions, expired links and audit rows past
    AUDIT_RETENTION_DAYS (90) go; their live counterparts stay; the counts are printed."""
    _, email, _ = register_and_login(admin)
    user = account_id(admin, email)
    ok(admin, "cleanup")  # what other tests left behind
    dead_sessions = [
        insert_session(admin, user, created=ago(hours=2), expires=ago(hours=1)),
        insert_session(
            admin, user, created=ago(hours=2), expires=ahead(days=1), revoked=ago(hours=1)
        ),
        insert_session(
            admin, user, created=ago(days=5), expires=ahead(days=1), seen=ago(days=4)
        ),  # idle beyond SESSION_IDLE_SECONDS (3 days)
        insert_session(admin, user, created=ago(days=4), expires=ahead(days=1)),  # never seen
    ]
    live_sessions = [
        insert_session(admin, user, created=ago(days=5), expires=ahead(days=1), seen=ago(hours=1)),
        insert_session(admin, user, created=ago(days=2), expires=ahead(days=1)),
    ]
    resets = {}
    for name, expires in (("dead", ago(minutes=1)), ("live", ahead(hours=1))):
        resets[name] = fresh_hash()
        sql_rows(
            admin,
            "INSERT INTO password_resets (token_hash, user_id, created_at, expires_at)"
            " VALUES (%s, %s, %s, %s)",
            (resets[name], user, stamp(admin, ago(hours=2)), stamp(admin, expires)),
        )
    links = {}
    for name, expires in (("dead", ago(minutes=1)), ("live", ahead(hours=1))):
        links[name] = fresh_hash()
        sql_rows(
            admin,
            "INSERT INTO email_tokens (token_hash, user_id, purpose, email, created_at,"
            " expires_at) VALUES (%s, %s, 'change', %s, %s, %s)",
            (links[name], user, random_email(), stamp(admin, ago(hours=2)), stamp(admin, expires)),
        )
    old, kept = f"old={random_hex(4)}", f"kept={random_hex(4)}"
    insert_event(admin, user, ago(days=91), old)
    insert_event(admin, user, ago(days=89), kept)
    usage_days = {
        "dead": ago(days=91).strftime("%Y-%m-%d"),
        "live": ago(days=89).strftime("%Y-%m-%d"),
    }
    for day in usage_days.values():
        sql_rows(
            admin,
            "INSERT INTO chat_usage (day, owner, user_id, address, provider, model, requests,"
            " prompt_tokens, completion_tokens, estimated)"
            " VALUES (%s, %s, %s, '192.0.2.1', 'echo', 'echo', 1, 10, 20, 1)",
            (day, f"user:{user}", user),
        )
    counts = cleanup_counts(ok(admin, "cleanup"))
    assert counts == {
        "sessions": 4,
        "password_resets": 1,
        "email_tokens": 1,
        "auth_events": 1,
        "chat_usage": 1,
    }
    days_left = sql_rows(admin, "SELECT day FROM chat_usage WHERE user_id = %s", (user,))
    assert [row["day"] for row in days_left] == [usage_days["live"]]
    assert surviving(admin, "sessions", "id_hash", dead_sessions + live_sessions) == set(
        live_sessions
    )
    assert surviving(admin, "password_resets", "token_hash", list(resets.values())) == {
        resets["live"]
    }
    assert surviving(admin, "email_tokens", "token_hash", list(links.values())) == {links["live"]}
    details = [
        r["detail"]
        for r in sql_rows(admin, "SELECT detail FROM auth_events WHERE user_id = %s", (user,))
    ]
    assert kept in details and old not in details
    again = cleanup_counts(ok(admin, "cleanup"))
    assert again == dict.fromkeys(again, 0)


def test_cleanup_goes_past_one_batch(admin: Server) -> None:
    """More dead sessions than one batch (CLEANUP_BATCH): every one goes in one run."""
    assert cloudchat.CLEANUP_BATCH == 500
    _, email, _ = register_and_login(admin)
    user = account_id(admin, email)
    ok(admin, "cleanup")
    count = 2 * cloudchat.CLEANUP_BATCH + 200
    prefix = random_hex(16)  # 32 hex digits; the row number fills the other 32
    if admin.setup == "postgres":
        key = "%s || lpad(n::text, 32, '0')"
    else:
        key = "%s || substr('00000000000000000000000000000000' || n, -32)"
    sql_rows(
        admin,
        "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < %s)"
        " INSERT INTO sessions (id_hash, user_id, created_at, expires_at)"
        f" SELECT {key}, %s, %s, %s FROM g",
        (count, prefix, user, stamp(admin, ago(hours=2)), stamp(admin, ago(hours=1))),
    )
    rows = sql_rows(
        admin,
        "SELECT count(*) AS n FROM sessions WHERE user_id = %s AND expires_at < %s",
        (user, stamp(admin, ago(seconds=1))),
    )
    assert rows[0]["n"] == count
    counts = cleanup_counts(ok(admin, "cleanup"))
    assert counts["sessions"] == count
    left = sql_rows(admin, "SELECT count(*) AS n FROM sessions WHERE user_id = %s", (user,))
    assert left[0]["n"] == 1  # the login's own session


def test_cleanup_waits_for_another_holder_of_the_lock(make_server: ServerFactory) -> None:
    """PostgreSQL: while another transaction holds the cleanup lock, `cleanup` exits 1
    saying so and deletes nothing; once it is released, cleanup runs."""
    import psycopg2

    server = make_server.start("postgres", {**HIGH_LIMITS, "CLEANUP_INTERVAL_SECONDS": "0"})
    _, email, _ = register_and_login(server)
    user = account_id(server, email)
    dead = insert_session(server, user, created=ago(hours=2), expires=ago(hours=1))
    holder = psycopg2.connect(server.env["DATABASE_URL"], connect_timeout=5)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (cloudchat.CLEANUP_LOCK_KEY,))
        stderr = fails(server, "cleanup")
        assert "another process holds the cleanup lock" in stderr
        assert surviving(server, "sessions", "id_hash", [dead]) == {dead}
    finally:
        holder.rollback()
        holder.close()
    assert cleanup_counts(ok(server, "cleanup"))["sessions"] == 1
    assert surviving(server, "sessions", "id_hash", [dead]) == set()


@pytest.mark.parametrize("setup", SETUPS)
def test_the_server_runs_cleanup_every_interval(make_server: ServerFactory, setup: str) -> None:
    """CLEANUP_INTERVAL_SECONDS=1: the server deletes an expired session on its own;
    with 0, a server beside it (started first) never runs the job."""
    idle = make_server.start(setup, {"CLEANUP_INTERVAL_SECONDS": "0"})
    busy = make_server.start(setup, {"CLEANUP_INTERVAL_SECONDS": "1"})
    dead = {}
    for server in (idle, busy):
        _, email, _ = register_and_login(server)
        user = account_id(server, email)
        dead[server.port] = insert_session(server, user, created=ago(hours=2), expires=ago(hours=1))
    wait_until(
        lambda: not surviving(busy, "sessions", "id_hash", [dead[busy.port]]),
        timeout=10,
        what="the server's cleanup job to delete the expired session",
    )
    # The positive marker: the run that deleted it (the idle server's dead row was there
    # before; the idle server has had as long as that to delete it).
    logged(busy, "cleanup: deleted 1 sessions", timeout=10)
    assert surviving(idle, "sessions", "id_hash", [dead[idle.port]]) == {dead[idle.port]}
    assert not [line for line in idle.logs if "cleanup:" in line], idle.log_text()


# -- the schema ------------------------------------------------------------------------------

OLD_POSTGRES = ROOT / "tests" / "schema_66a5f54.sql"
OLD_SQLITE = ROOT / "tests" / "schema_66a5f54_sqlite.sql"
# What a version-3 database (the release before the audit log) has beyond 66a5f54's schema.
V3_POSTGRES = """
ALTER TABLE sessions ADD COLUMN last_seen_at timestamptz;
CREATE TABLE server_secrets (
    name text PRIMARY KEY, value text NOT NULL, created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE schema_migrations (
    version integer PRIMARY KEY, description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO schema_migrations (version, description) VALUES
    (1, 'users, credentials, sessions, password resets'),
    (2, 'server_secrets: the key that signs cookies in development'),
    (3, 'sessions.last_seen_at: sessions per device');
"""
V3_SQLITE = """
ALTER TABLE sessions ADD COLUMN last_seen_at TEXT;
CREATE TABLE server_secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE schema_migrations (
    version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL
);
INSERT INTO schema_migrations (version, description, applied_at) VALUES
    (1, 'users, credentials, sessions, password resets', '2025-01-01 00:00:00.000000+00:00'),
    (2, 'server_secrets: the key that signs cookies in development',
        '2025-01-01 00:00:00.000000+00:00'),
    (3, 'sessions.last_seen_at: sessions per device', '2025-01-01 00:00:00.000000+00:00');
"""


def _old_database(
    make_server: ServerFactory, setup: str, version: str, tmp_path: Path
) -> tuple[dict[str, str], Path]:
    """(environment, work dir) of a database left by 66a5f54 or by the version-3 release."""
    if setup == "embedded":
        path = tmp_path / "old.db"
        with sqlite3.connect(path) as db:
            db.executescript(OLD_SQLITE.read_text())
            if version == "v3":
                db.executescript(V3_SQLITE)
        db.close()
        return make_server.env(setup, {"CLOUDCHAT_DB_PATH": str(path)})
    pg: PgDatabases = make_server.request.getfixturevalue("pg")
    url = pg.create(from_template=False)
    conn = pg.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(OLD_POSTGRES.read_text())
            if version == "v3":
                cur.execute(V3_POSTGRES)
    finally:
        conn.close()
    return make_server.env(setup, {"DATABASE_URL": url})


def _columns(env: dict[str, str], table: str) -> set[str]:
    """The columns of a table in the environment's database (empty: no such table)."""
    probe = Server(setup="", env=env, workdir=Path())
    if env.get("DATABASE_URL"):
        rows = sql_rows(
            probe,
            "SELECT column_name AS name FROM information_schema.columns WHERE table_name = %s",
            (table,),
        )
    else:
        rows = sql_rows(probe, f"SELECT name FROM pragma_table_info('{table}')")
    return {row["name"] for row in rows}


@pytest.mark.parametrize("version", ["66a5f54", "v3"])
@pytest.mark.parametrize("setup", SETUPS)
def test_initdb_upgrades_an_older_database_to_the_current_version(
    make_server: ServerFactory, tmp_path: Path, setup: str, version: str
) -> None:
    """initdb on an older database adds users.email_verified_at, email_tokens and
    auth_events (its user_id a foreign key to users, ON DELETE CASCADE), version 5's
    two-factor columns and table, and records every version; the server then keeps an
    audit log in it."""
    env, workdir = _old_database(make_server, setup, version, tmp_path)
    assert "email_verified_at" not in _columns(env, "users")
    assert _columns(env, "auth_events") == set()
    done = run_cli(["initdb"], env, workdir)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "email_verified_at" in _columns(env, "users")
    assert "last_seen_at" in _columns(env, "sessions")
    assert _columns(env, "email_tokens") >= {
        "token_hash",
        "user_id",
        "purpose",
        "email",
        "created_at",
        "expires_at",
    }
    assert _columns(env, "auth_events") >= EVENT_FIELDS - {"at"} | {"id", "created_at"}
    assert _columns(env, "credentials") >= {"confirmed_at", "last_step"}
    assert _columns(env, "mfa_recovery_codes") == {"code_hash", "user_id", "created_at"}
    probe = Server(setup=setup, env=env, workdir=workdir)
    if setup == "postgres":
        fks = sql_rows(
            probe,
            "SELECT confrelid::regclass::text AS target, confdeltype AS on_delete"
            " FROM pg_constraint WHERE conrelid = 'auth_events'::regclass AND contype = 'f'",
        )
        assert fks == [{"target": "users", "on_delete": "c"}]
    else:
        fks = sql_rows(
            probe, "SELECT \"table\", on_delete FROM pragma_foreign_key_list('auth_events')"
        )
        assert fks == [{"table": "users", "on_delete": "CASCADE"}]
    versions = sql_rows(probe, "SELECT version FROM schema_migrations ORDER BY version")
    assert [row["version"] for row in versions] == list(range(1, cloudchat.SCHEMA_VERSION + 1))
    assert cloudchat.SCHEMA_VERSION >= 4
    if version == "v3":
        server = make_server.launch(setup, env, workdir)
        _, email, _ = register_and_login(server)
        assert event_names(audit_json(server, email)) == ["register", "login_ok"]
