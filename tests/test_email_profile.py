"""Issue 15 items 2-5: email verification (off, optional, required), resending the link,
changing the address, PATCH /auth/me, and the audit rows these leave; both setups."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import SETUPS, RedisDb, shared_server
from tests.helpers import (
    ALL_LIMITS_RAISED,
    HIGH_LIMITS,
    INVALID_CREDENTIALS,
    UNAUTHORIZED,
    Client,
    Response,
    Server,
    assert_error,
    logged,
    random_email,
    random_phone,
    sql_rows,
    strong_password,
    wait_until,
)
from tests.mailsink import MailSink, Received
from tests.test_password import SITE  # the same site as the reset mails'

VERIFY_LINK_RE = re.compile(r"https://acme\.example/app/verify_email\?token=([A-Za-z0-9_\-]+)")
VERIFY_SUBJECT = "Confirm your email address for Acme Chat"
CHANGE_SUBJECT = "Confirm your new email address for Acme Chat"
NOTICE_SUBJECT = "Your Acme Chat email address is about to change"
WELCOME_SUBJECT = "Welcome to Acme Chat"
NOTHING_TO_RESEND = "verification: no unverified active account for the identifier"
RESEND_LIMITED = "verification: over the rate limit of the account, nothing sent"
# Every test of the shared servers comes from 127.0.0.1: its limits are out of the way.
OPEN_LIMITS = {**ALL_LIMITS_RAISED, "RATE_TOKEN_IP": "100000/600"}
# The limits under test, on a server of their own (each client there has its own address).
LOW_LIMITS = {
    **HIGH_LIMITS,
    "RATE_FORGOT_IP": "100000/3600",
    "RATE_FORGOT_IDENTIFIER": "2/3600",
    "RATE_TOKEN_IP": "3/600",
}
OK = {"ok": True}


# -- servers ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=SETUPS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sink: MailSink
) -> Iterator[Server]:
    """EMAIL_VERIFICATION=optional, mailing the sink, limits out of the way."""
    overrides = {**OPEN_LIMITS, **SITE, **sink.env(), "EMAIL_VERIFICATION": "optional"}
    yield from shared_server(request, tmp_path_factory, overrides)


@pytest.fixture(scope="module", params=SETUPS)
def required_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sink: MailSink
) -> Iterator[Server]:
    """EMAIL_VERIFICATION=required, mailing the sink, limits out of the way."""
    overrides = {**OPEN_LIMITS, **SITE, **sink.env(), "EMAIL_VERIFICATION": "required"}
    yield from shared_server(request, tmp_path_factory, overrides)


@pytest.fixture(scope="module", params=SETUPS)
def limited_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sink: MailSink
) -> Iterator[Server]:
    """EMAIL_VERIFICATION=off (the default), with low token and per-account mail limits."""
    overrides = {**LOW_LIMITS, **SITE, **sink.env(), "EMAIL_VERIFICATION": None}
    yield from shared_server(request, tmp_path_factory, overrides)


# -- helpers ------------------------------------------------------------------------------

_addresses = itertools.count(1)


def new_ip() -> str:
    """An address from 198.18.0.0/15 (benchmarking) not used before in this module."""
    n = next(_addresses)
    return f"198.18.{n // 250}.{n % 250 + 1}"


def stranger(server: Server) -> Client:
    """A browser with no session, at an address of its own (its own rate-limit keys)."""
    return server.client({"X-Forwarded-For": new_ip()})


def link_token(received: Received) -> str:
    """The token of the verify_email link in a mail (plain text; the HTML part has it too)."""
    match = VERIFY_LINK_RE.search(received.text())
    assert match, received.text()
    token = match.group(1)
    assert f"verify_email?token={token}" in received.html()
    return token


def mails_with(mail: MailSink, address: str, subject: str, count: int = 1) -> list[Received]:
    """Wait until `count` mails with this subject reached the address; all of them."""
    return wait_until(
        lambda: (
            len(found := [m for m in mail.to(address) if m.message["Subject"] == subject]) >= count
            and found
        ),
        10,
        what=f"{count} mail(s) {subject!r} to {address}",
    )


def register(server: Server, mail: MailSink, **extra: Any) -> tuple[str, str]:
    """Register a fresh account and wait for its first mail; (email, password)."""
    email, password = random_email(), strong_password()
    answer = stranger(server).register(email, password, **extra)
    assert answer.status == 201, answer
    mail.wait_for(email)
    return email, password


def register_unverified(server: Server, mail: MailSink, **extra: Any) -> tuple[str, str, str]:
    """Register on a server that mails a verify link; (email, password, link token)."""
    email, password = register(server, mail, **extra)
    (verify,) = mails_with(mail, email, VERIFY_SUBJECT)
    return email, password, link_token(verify)


def signed_in(server: Server, email: str, password: str, agent: str = "") -> Client:
    """A fresh browser (own address, optional User-Agent) signed in to the account."""
    headers = {"X-Forwarded-For": new_ip()}
    if agent:
        headers["User-Agent"] = agent
    browser = server.client(headers)
    answer = browser.login(email, password)
    assert answer.status == 200, answer
    return browser


def verify(client: Client, token: Any) -> Response:
    """POST /auth/email/verify {"token": token}."""
    return client.post("/auth/email/verify", {"token": token})


def resend(client: Client, identifier: str) -> Response:
    """POST /auth/email/resend {"identifier"}: always 200 {"ok": true}."""
    answer = client.post("/auth/email/resend", {"identifier": identifier})
    assert answer.status == 200 and answer.json() == OK, answer
    return answer


def change_email(client: Client, password: Any, new_email: Any) -> Response:
    """POST /auth/email/change."""
    return client.post("/auth/email/change", {"password": password, "new_email": new_email})


def request_change(
    server: Server, mail: MailSink, client: Client, password: str, new_email: str
) -> str:
    """Ask for a move to new_email and return the token mailed there."""
    answer = change_email(client, password, new_email)
    assert answer.status == 200 and answer.json() == OK, answer
    (link,) = mails_with(mail, new_email.strip().lower(), CHANGE_SUBJECT)
    return link_token(link)


def patch_me(client: Client, body: Any) -> Response:
    """PATCH /auth/me with a JSON body."""
    return client.request("PATCH", "/auth/me", json_body=body)


def me(client: Client) -> dict[str, Any]:
    """The signed-in user's object from GET /auth/me."""
    answer = client.me()
    assert answer.status == 200, answer
    return answer.json()["user"]


def user_id_of(server: Server, email: str) -> int:
    """The users.id of an address."""
    (row,) = sql_rows(server, "SELECT id FROM users WHERE email = %s", (email,))
    return int(row["id"])


def assert_uniform_401(answer: Response) -> None:
    """The one login failure: 401 Invalid credentials, no session cookie."""
    assert answer.status == 401, answer
    assert answer.json() == INVALID_CREDENTIALS
    assert answer.cookie("cc_auth") is None


# -- EMAIL_VERIFICATION modes -------------------------------------------------------------


def test_off_mode_sends_the_welcome_and_blocks_nothing(
    limited_server: Server, mail: MailSink
) -> None:
    """off: the welcome mail as before, no link; unverified, and login works. A resend
    still mails a link (it works in every mode) and the link verifies the address."""
    server = limited_server
    email, password = register(server, mail)
    (welcome,) = mail.to(email)
    assert welcome.message["Subject"] == WELCOME_SUBJECT
    assert "verify_email" not in welcome.text()
    browser = signed_in(server, email, password)
    user = me(browser)
    assert user["email"] == email
    assert user["email_verified"] is False and user["mfa_enabled"] is False

    resend(stranger(server), email)
    token = link_token(mails_with(mail, email, VERIFY_SUBJECT)[0])
    assert verify(stranger(server), token).json() == OK
    assert me(browser)["email_verified"] is True


def test_optional_mode_mails_a_link_and_blocks_nothing(server: Server, mail: MailSink) -> None:
    """optional: the verify mail instead of the welcome; login works unverified; the link
    flips email_verified, at once also for a session already signed in (and cached)."""
    email, password = register(server, mail)
    (received,) = mail.to(email)
    assert received.message["Subject"] == VERIFY_SUBJECT
    assert received.rcpt_tos == [email]
    token = link_token(received)
    assert len(token) >= 43
    assert "24 hours" in received.text()

    browser = signed_in(server, email, password)
    before = me(browser)
    assert before["email_verified"] is False and before["mfa_enabled"] is False
    answer = verify(stranger(server), token)
    assert answer.status == 200 and answer.json() == OK, answer
    assert me(browser)["email_verified"] is True
    assert me(signed_in(server, email, password))["email_verified"] is True
    assert [m.message["Subject"] for m in mail.to(email)] == [VERIFY_SUBJECT]


def test_required_mode_refuses_login_until_verified(
    required_server: Server, mail: MailSink
) -> None:
    """required: 403 email_not_verified for the right password only (by email or phone);
    a wrong one gets the very answer of an unknown account; after the link, login works."""
    server = required_server
    digits, phone = random_phone()
    email, password, token = register_unverified(server, mail, phone=phone)

    for identifier in (email, email.upper(), "+" + digits):
        refused = stranger(server).login(identifier, password)
        body = assert_error(refused, 403, "email_not_verified")
        assert refused.cookie("cc_auth") is None, refused
        assert "email" in body["error"].lower()
    wrong = stranger(server).login(email, "wrong-" + password)
    unknown = stranger(server).login(random_email(), password)
    assert_uniform_401(wrong)
    assert_uniform_401(unknown)
    assert wrong.json() == unknown.json()

    assert verify(stranger(server), token).json() == OK
    browser = signed_in(server, email, password)
    assert me(browser)["email_verified"] is True
    assert stranger(server).login("+" + digits, password).status == 200
    assert_uniform_401(stranger(server).login(email, "wrong-" + password))

    reasons = [
        row["detail"]
        for row in sql_rows(
            server,
            "SELECT detail FROM auth_events WHERE user_id = %s AND event = 'login_failed'"
            " ORDER BY id",
            (user_id_of(server, email),),
        )
    ]
    assert reasons == ["reason=email_not_verified"] * 3 + ["reason=password"] * 2


def test_required_mode_resend_gives_a_working_link(required_server: Server, mail: MailSink) -> None:
    """required: a resent link works (the first one stops), then the account signs in."""
    server = required_server
    email, password, first = register_unverified(server, mail)
    resend(stranger(server), email)
    second = link_token(mails_with(mail, email, VERIFY_SUBJECT, 2)[-1])
    assert second != first
    assert_error(verify(stranger(server), first), 400, "invalid_token")
    assert_error(stranger(server).login(email, password), 403, "email_not_verified")
    assert verify(stranger(server), second).json() == OK
    assert stranger(server).login(email, password).status == 200


# -- the verify token ---------------------------------------------------------------------


def test_verify_token_works_once(server: Server, mail: MailSink) -> None:
    """A link works once: a replay is 400 invalid_token, and the address stays verified."""
    email, password, token = register_unverified(server, mail)
    assert verify(stranger(server), token).json() == OK
    replay = verify(stranger(server), token)
    assert assert_error(replay, 400, "invalid_token")["error"] == "Token invalid or expired"
    assert me(signed_in(server, email, password))["email_verified"] is True


@pytest.mark.parametrize(
    "token",
    [
        secrets.token_urlsafe(32),
        "garbage!",
        "a" * 128,
        "a" * 129,
        "x" * 5000,
        "",
        "   ",
        "../verify_email?token=",
        "é" * 40,
    ],
    ids=["unknown", "garbage", "128", "129", "5000", "empty", "blank", "path", "unicode"],
)
def test_verify_refuses_unknown_tokens(server: Server, token: str) -> None:
    """Unknown, malformed, too long or empty: 400 invalid_token."""
    assert_error(verify(stranger(server), token), 400, "invalid_token")


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{}", "application/json", 400, "invalid_token"),
        (b'{"token": 123}', "application/json", 400, "invalid_input"),
        (b'{"token": ["x"]}', "application/json", 400, "invalid_input"),
        (b'{"token": {"a": 1}}', "application/json", 400, "invalid_input"),
        (b'{"token": true}', "application/json", 400, "invalid_input"),
        (b'{"token": "a\\u0000b"}', "application/json", 400, "invalid_input"),
        (b'{"token": "\\ud800"}', "application/json", 400, "invalid_input"),
        (b"not json", "application/json", 400, "invalid_json"),
        (b'["token"]', "application/json", 400, "invalid_json"),
        (b'"token"', "application/json", 400, "invalid_json"),
        (b"token=abc", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b'{"token": "abc"}', "text/plain", 415, "unsupported_media_type"),
        (b'{"token": "abc"}', None, 415, "unsupported_media_type"),
    ],
    ids=[
        "no-token",
        "number",
        "list",
        "object",
        "bool",
        "nul",
        "surrogate",
        "not-json",
        "array",
        "string",
        "form",
        "text-plain",
        "no-content-type",
    ],
)
def test_verify_refuses_bad_bodies(
    server: Server, body: bytes, content_type: str | None, status: int, code: str
) -> None:
    """A body that is not a JSON object with a string token: a 4xx envelope, never 5xx."""
    headers = {"Content-Type": content_type} if content_type else {}
    answer = stranger(server).request("POST", "/auth/email/verify", body=body, headers=headers)
    assert_error(answer, status, code)


def test_failed_attempts_leave_the_link_working(server: Server, mail: MailSink) -> None:
    """Wrong tokens, and the stored hash of the right one, do not burn the link."""
    email, _, token = register_unverified(server, mail)
    (row,) = sql_rows(
        server,
        "SELECT token_hash FROM email_tokens WHERE user_id = %s",
        (user_id_of(server, email),),
    )
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    for wrong in (row["token_hash"], token[:-1], token + "A", token.upper()):
        if wrong != token:
            assert_error(verify(stranger(server), wrong), 400, "invalid_token")
    assert verify(stranger(server), f"  {token}  ").json() == OK


@pytest.mark.parametrize("purpose", ["verify", "change"])
def test_concurrent_uses_of_one_link_exactly_one_wins(
    server: Server, mail: MailSink, purpose: str
) -> None:
    """Eight browsers using one link at once: one 200, seven 400 invalid_token."""
    email, password, token = register_unverified(server, mail)
    new_email = random_email()
    if purpose == "change":
        token = request_change(
            server, mail, signed_in(server, email, password), password, new_email
        )
    browsers = [stranger(server) for _ in range(8)]
    barrier = threading.Barrier(len(browsers))
    answers: list[Response] = []
    lock = threading.Lock()

    def use(browser: Client) -> None:
        barrier.wait(10)
        answer = verify(browser, token)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=use, args=(b,)) for b in browsers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] + [400] * 7, answers
    for answer in answers:
        if answer.status == 400:
            assert_error(answer, 400, "invalid_token")
    address = new_email if purpose == "change" else email
    user = me(signed_in(server, address, password))
    assert user["email"] == address and user["email_verified"] is True
    events = "email_changed" if purpose == "change" else "email_verified"
    rows = sql_rows(
        server,
        "SELECT id FROM auth_events WHERE user_id = %s AND event = %s",
        (user["id"], events),
    )
    assert len(rows) == 1


@pytest.mark.parametrize("purpose", ["verify", "change"])
def test_expired_link_is_refused(server: Server, mail: MailSink, purpose: str) -> None:
    """A link past EMAIL_TOKEN_TTL: 400 invalid_token, nothing changes."""
    email, password, token = register_unverified(server, mail)
    browser = signed_in(server, email, password)
    if purpose == "change":
        token = request_change(server, mail, browser, password, random_email())
    sql_rows(
        server,
        "UPDATE email_tokens SET expires_at = created_at WHERE user_id = %s",
        (user_id_of(server, email),),
    )
    assert_error(verify(stranger(server), token), 400, "invalid_token")
    user = me(browser)
    assert user["email"] == email and user["email_verified"] is False


def test_inactive_account_gets_no_link_and_its_link_is_void(server: Server, mail: MailSink) -> None:
    """A deactivated account: a resend mails nothing (200 all the same), and the link it
    had does not verify it."""
    email, _, token = register_unverified(server, mail)
    sql_rows(server, "UPDATE users SET is_active = %s WHERE email = %s", (False, email))
    since = len(server.logs)
    resend(stranger(server), email)
    logged(server, NOTHING_TO_RESEND, since=since)
    assert_error(verify(stranger(server), token), 400, "invalid_token")
    (row,) = sql_rows(server, "SELECT email_verified_at FROM users WHERE email = %s", (email,))
    assert row["email_verified_at"] is None
    assert len(mail.to(email)) == 1


def test_token_ip_limit(limited_server: Server, mail: MailSink) -> None:
    """RATE_TOKEN_IP=3/600: the 4th attempt from one address is 429 with Retry-After, even
    with a valid token (counted before the token is looked at); another address is not
    stopped, and the link was not burnt."""
    server = limited_server
    email, password = register(server, mail)
    resend(stranger(server), email)
    token = link_token(mails_with(mail, email, VERIFY_SUBJECT)[0])

    guesser = stranger(server)
    for _ in range(3):
        assert_error(verify(guesser, secrets.token_urlsafe(32)), 400, "invalid_token")
    limited = verify(guesser, secrets.token_urlsafe(32))
    assert_error(limited, 429, "rate_limited")
    assert 0 < int(limited.header("Retry-After") or 0) <= 600
    assert_error(verify(guesser, token), 429, "rate_limited")

    assert verify(stranger(server), token).json() == OK
    assert me(signed_in(server, email, password))["email_verified"] is True


# -- resend -------------------------------------------------------------------------------


def test_resend_answers_alike_and_mails_only_the_unverified(server: Server, mail: MailSink) -> None:
    """Unknown, verified and unverified accounts: the same 200; only the unverified one
    gets a mail, with a fresh link (the older link stops working)."""
    unverified, _, old_token = register_unverified(server, mail)
    verified, _, token = register_unverified(server, mail)
    assert verify(stranger(server), token).json() == OK
    unknown = random_email()

    since = len(server.logs)
    answers = [resend(stranger(server), who) for who in (unknown, verified, unverified.upper())]
    assert len({a.body for a in answers}) == 1
    newer = link_token(mails_with(mail, unverified, VERIFY_SUBJECT, 2)[-1])
    logged(server, NOTHING_TO_RESEND, 2, since=since)
    assert mail.to(unknown) == []
    assert [m.message["Subject"] for m in mail.to(verified)] == [VERIFY_SUBJECT]
    assert len(mail.to(unverified)) == 2

    assert newer != old_token
    assert_error(verify(stranger(server), old_token), 400, "invalid_token")
    assert verify(stranger(server), newer).json() == OK


def test_resend_by_phone(server: Server, mail: MailSink) -> None:
    """The identifier may be the account's phone, written with other spacing."""
    digits, phone = random_phone()
    email, password, _ = register_unverified(server, mail, phone=phone)
    address = new_ip()
    resend(server.client({"X-Forwarded-For": address}), f"+{digits[0]} {digits[1:]}")
    token = link_token(mails_with(mail, email, VERIFY_SUBJECT, 2)[-1])
    # Recorded in the background, with the address of the request that asked for it.
    wait_until(
        lambda: sql_rows(
            server,
            "SELECT id FROM auth_events WHERE user_id = %s AND event = 'verification_sent'"
            " AND ip = %s",
            (user_id_of(server, email), address),
        ),
        10,
        what="the resend's verification_sent row",
    )
    assert verify(stranger(server), token).json() == OK
    assert me(signed_in(server, email, password))["email_verified"] is True


@pytest.mark.parametrize(
    ("body", "status"),
    [({}, 400), ({"identifier": 5}, 400), ({"identifier": "   "}, 400), ("x", 400)],
    ids=["missing", "number", "blank", "not-an-object"],
)
def test_resend_bad_input(server: Server, body: Any, status: int) -> None:
    """A missing or mistyped identifier: 400 (as forgot does), never a 5xx."""
    answer = stranger(server).post("/auth/email/resend", body)
    assert_error(answer, status, ("invalid_input", "invalid_json"))


def test_resend_account_limit(limited_server: Server, mail: MailSink) -> None:
    """RATE_FORGOT_IDENTIFIER=2/3600: two resends mail links, the next ones mail nothing
    and still answer 200, from any address; the last link mailed works."""
    server = limited_server
    email, password = register(server, mail)
    since = len(server.logs)
    for _ in range(4):
        resend(stranger(server), email)
    links = mails_with(mail, email, VERIFY_SUBJECT, 2)
    logged(server, RESEND_LIMITED, 2, since=since)
    # A mail that must arrive after any the limited resends could have sent.
    marker, _ = register(server, mail)
    resend(stranger(server), marker)
    mails_with(mail, marker, VERIFY_SUBJECT)
    subjects = [m.message["Subject"] for m in mail.to(email)]
    assert subjects == [WELCOME_SUBJECT, VERIFY_SUBJECT, VERIFY_SUBJECT], subjects
    # The two mails may arrive in either order: the newer link works, the older does not.
    statuses = sorted(verify(stranger(server), link_token(m)).status for m in links)
    assert statuses == [200, 400], statuses
    assert me(signed_in(server, email, password))["email_verified"] is True


# -- changing the address -----------------------------------------------------------------


def test_change_requires_login(server: Server) -> None:
    """No session: 401, whatever the body."""
    answer = change_email(server.client(), "whatever-123", random_email())
    assert answer.status == 401 and answer.json() == UNAUTHORIZED


def test_change_refuses_bad_requests_and_mails_nothing(server: Server, mail: MailSink) -> None:
    """Wrong password 401, same address 400, invalid address 400 invalid_email, taken 409,
    missing fields 400: no mail for any, the address unchanged."""
    email, password, _ = register_unverified(server, mail)
    taken, _, _ = register_unverified(server, mail)
    browser = signed_in(server, email, password)
    target = random_email()

    assert_uniform_401(change_email(browser, "wrong-" + password, target))
    for same in (email, email.upper(), f"  {email} "):
        assert_error(change_email(browser, password, same), 400, "invalid_input")
    for bad in (
        "not-an-address",
        "a b@example.com",
        f"{target}, x@example.com",
        f"<{target}>",
        "x@exa mple.com",
        "zo\u00eb@example.com",
        f"{target}\r\nBcc: x@example.com",
    ):
        assert_error(change_email(browser, password, bad), 400, "invalid_email")
    for body in ({}, {"password": password}, {"new_email": target}):
        assert_error(browser.post("/auth/email/change", body), 400, "invalid_input")
    assert_error(change_email(browser, 123, target), 400, "invalid_input")
    assert_error(change_email(browser, password, ["x"]), 400, "invalid_input")
    assert_error(change_email(browser, password, taken.upper()), 409, "email_taken")

    # A change that goes through: its mails come after any the refused ones could send.
    good = random_email()
    request_change(server, mail, browser, password, good)
    mails_with(mail, email, NOTICE_SUBJECT)
    assert len(mail.to(email)) == 2  # the verify link at registration, one notice
    assert len(mail.to(taken)) == 1
    assert mail.to(target) == []
    assert me(browser)["email"] == email


def test_change_end_to_end(server: Server, mail: MailSink) -> None:
    """The link goes to the new address, a notice (address masked) to the old; nothing
    changes until the link is used; then the new address is the account's and verified,
    the old one signs in no more, other devices are out, this browser stays, and a
    password-reset link from before is void."""
    email, password, _ = register_unverified(server, mail)
    browser = signed_in(server, email, password)
    others = [signed_in(server, email, password) for _ in range(2)]
    new_email = random_email()

    assert server.client().post("/auth/password/forgot", {"identifier": email}).status == 200
    reset_token = mails_with(mail, email, "Reset your Acme Chat password")[0].reset_token()

    token = request_change(server, mail, browser, password, f"  {new_email.upper()} ")
    (link,) = mail.to(new_email)
    assert link.rcpt_tos == [new_email] and link.message["To"] == new_email
    (notice,) = mails_with(mail, email, NOTICE_SUBJECT)
    assert notice.rcpt_tos == [email]
    masked = new_email[0] + "***@example.com"
    assert masked in notice.text()
    assert new_email not in notice.text() and new_email not in notice.html()
    assert "verify_email" not in notice.text() and token not in notice.text()

    # Until the link is used, nothing changes.
    assert me(browser)["email"] == email and me(browser)["email_verified"] is False
    assert stranger(server).login(email, password).status == 200
    assert_uniform_401(stranger(server).login(new_email, password))

    answer = verify(browser, token)
    assert answer.status == 200 and answer.json() == OK, answer
    user = me(browser)
    assert user["email"] == new_email and user["email_verified"] is True
    for other in others:
        assert_error(other.me(), 401, "unauthorized")
    assert_uniform_401(stranger(server).login(email, password))
    assert me(signed_in(server, new_email, password))["email"] == new_email
    assert_error(verify(stranger(server), token), 400, "invalid_token")
    reset = server.client().post(
        "/auth/password/reset", {"token": reset_token, "password": strong_password()}
    )
    assert_error(reset, 400, "invalid_token")
    # The old address is free again.
    assert stranger(server).register(email, strong_password()).status == 201


@pytest.mark.parametrize("used_by", ["another_user", "anonymous"])
def test_change_link_used_in_another_browser(server: Server, mail: MailSink, used_by: str) -> None:
    """A link opened in a browser not signed in to the account moves the right account and
    ends all its sessions; the browser that opened it keeps whatever session it had."""
    alice, alice_password, _ = register_unverified(server, mail)
    alice_browser = signed_in(server, alice, alice_password)
    bob, bob_password, _ = register_unverified(server, mail)
    bob_browser = signed_in(server, bob, bob_password)
    bob_before = me(bob_browser)
    opener = bob_browser if used_by == "another_user" else stranger(server)
    new_email = random_email()
    token = request_change(server, mail, alice_browser, alice_password, new_email)

    assert verify(opener, token).json() == OK
    assert_error(alice_browser.me(), 401, "unauthorized")
    assert me(bob_browser) == bob_before
    if used_by == "anonymous":
        assert_error(opener.me(), 401, "unauthorized")
    moved = me(signed_in(server, new_email, alice_password))
    assert moved["email"] == new_email and moved["email_verified"] is True
    assert moved["id"] != bob_before["id"]
    assert_uniform_401(stranger(server).login(alice, alice_password))
    assert stranger(server).login(bob, bob_password).status == 200
    # None of Alice's sessions is alive, whoever holds it.
    (live,) = sql_rows(
        server,
        "SELECT count(*) AS n FROM sessions WHERE user_id = %s AND revoked_at IS NULL",
        (moved["id"],),
    )
    assert live["n"] == 1  # the login just above


def test_address_taken_before_the_link_is_used(server: Server, mail: MailSink) -> None:
    """Another account registers the new address meanwhile: the link answers 409
    email_taken and nothing changes."""
    email, password, _ = register_unverified(server, mail)
    browser = signed_in(server, email, password)
    new_email = random_email()
    token = request_change(server, mail, browser, password, new_email)
    assert stranger(server).register(new_email, strong_password()).status == 201
    assert_error(verify(stranger(server), token), 409, "email_taken")
    assert me(browser)["email"] == email
    assert stranger(server).login(email, password).status == 200


def test_two_accounts_asking_for_the_same_address(server: Server, mail: MailSink) -> None:
    """Two accounts each get a link for one new address: the first used wins, the other
    answers 409 email_taken and leaves its account as it was."""
    alice, alice_password, _ = register_unverified(server, mail)
    bob, bob_password, _ = register_unverified(server, mail)
    alice_browser = signed_in(server, alice, alice_password)
    bob_browser = signed_in(server, bob, bob_password)
    wanted = random_email()
    assert change_email(alice_browser, alice_password, wanted).status == 200
    assert change_email(bob_browser, bob_password, wanted).status == 200
    alice_link, bob_link = (link_token(m) for m in mails_with(mail, wanted, CHANGE_SUBJECT, 2))
    # The two mails may arrive in either order: tell the links apart by their rows.
    bob_hash = sql_rows(
        server,
        "SELECT token_hash FROM email_tokens WHERE user_id = %s AND purpose = 'change'",
        (user_id_of(server, bob),),
    )[0]["token_hash"]
    if hashlib.sha256(alice_link.encode()).hexdigest() == bob_hash:
        alice_link, bob_link = bob_link, alice_link
    assert verify(bob_browser, bob_link).json() == OK
    assert_error(verify(alice_browser, alice_link), 409, "email_taken")
    assert me(bob_browser)["email"] == wanted
    assert me(alice_browser)["email"] == alice
    assert stranger(server).login(alice, alice_password).status == 200


def test_a_newer_change_voids_the_older_link(server: Server, mail: MailSink) -> None:
    """Two changes asked for: only the newer link works."""
    email, password, _ = register_unverified(server, mail)
    browser = signed_in(server, email, password)
    first, second = random_email(), random_email()
    older = request_change(server, mail, browser, password, first)
    newer = request_change(server, mail, browser, password, second)
    assert_error(verify(stranger(server), older), 400, "invalid_token")
    assert me(browser)["email"] == email
    assert verify(browser, newer).json() == OK
    assert me(browser)["email"] == second


def test_a_verify_link_for_the_old_address_is_stale(server: Server, mail: MailSink) -> None:
    """After a move, the verify link mailed to the old address does nothing."""
    email, password, verify_token = register_unverified(server, mail)
    browser = signed_in(server, email, password)
    new_email = random_email()
    assert verify(browser, request_change(server, mail, browser, password, new_email)).json() == OK
    assert_error(verify(stranger(server), verify_token), 400, "invalid_token")
    assert me(browser)["email"] == new_email


@pytest.mark.parametrize("how", ["change", "reset"])
def test_password_change_voids_a_pending_change_link(
    server: Server, mail: MailSink, how: str
) -> None:
    """A password change or reset (what an owner does on the notice) ends the move."""
    email, password, _ = register_unverified(server, mail)
    browser = signed_in(server, email, password)
    new_email = random_email()
    token = request_change(server, mail, browser, password, new_email)
    new_password = strong_password()
    if how == "change":
        answer = browser.post(
            "/auth/password/change",
            {"current_password": password, "new_password": new_password},
        )
    else:
        assert server.client().post("/auth/password/forgot", {"identifier": email}).status == 200
        reset = mails_with(mail, email, "Reset your Acme Chat password")[0].reset_token()
        answer = server.client().post(
            "/auth/password/reset", {"token": reset, "password": new_password}
        )
    assert answer.status == 200, answer
    assert_error(verify(stranger(server), token), 400, "invalid_token")
    assert me(signed_in(server, email, new_password))["email"] == email
    assert_uniform_401(stranger(server).login(new_email, new_password))


def test_change_account_limit(limited_server: Server, mail: MailSink) -> None:
    """RATE_FORGOT_IDENTIFIER=2/3600 counts change requests per account: the third is 429."""
    server = limited_server
    email, password = register(server, mail)
    browser = signed_in(server, email, password)
    targets = [random_email() for _ in range(3)]
    for target in targets[:2]:
        assert change_email(browser, password, target).status == 200
    limited = change_email(browser, password, targets[2])
    assert_error(limited, 429, "rate_limited")
    assert int(limited.header("Retry-After") or 0) > 0
    mails_with(mail, targets[1], CHANGE_SUBJECT)
    mails_with(mail, email, NOTICE_SUBJECT, 2)
    assert mail.to(targets[2]) == []


# -- PATCH /auth/me -----------------------------------------------------------------------


def test_patch_sets_and_clears_the_profile(server: Server, mail: MailSink) -> None:
    """Set both fields, then clear them with null and with ""; each answer is the user
    object /auth/me shows; a phone set here signs in, a cleared one no more."""
    email, password, _ = register_unverified(server, mail)
    browser = signed_in(server, email, password)
    digits, phone = random_phone()

    answer = patch_me(browser, {"display_name": "  Ada Lovelace ", "phone": phone})
    assert answer.status == 200, answer
    body = answer.json()
    assert body["ok"] is True
    assert body["user"]["display_name"] == "Ada Lovelace"
    assert body["user"]["phone"] == "+" + digits
    assert body["user"] == me(browser)
    assert stranger(server).login(f"+{digits}", password).status == 200

    name = "Zo\u00eb \u674e " + "n" * 58
    assert len(name) == 64
    assert patch_me(browser, {"display_name": name}).json()["user"]["display_name"] == name
    cleared = patch_me(browser, {"display_name": None}).json()["user"]
    assert cleared["display_name"] is None and cleared["phone"] == "+" + digits
    cleared = patch_me(browser, {"phone": ""}).json()["user"]
    assert cleared["phone"] is None and cleared["display_name"] is None
    assert patch_me(browser, {"display_name": "Bo"}).json()["user"]["display_name"] == "Bo"
    assert patch_me(browser, {"display_name": ""}).json()["user"]["display_name"] is None
    assert patch_me(browser, {"phone": phone}).json()["user"]["phone"] == "+" + digits
    assert patch_me(browser, {"phone": None}).json()["user"]["phone"] is None
    assert_uniform_401(stranger(server).login(f"+{digits}", password))
    user = me(browser)
    assert user["email"] == email and user["display_name"] is None and user["phone"] is None


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"email": "x@example.com"}, "invalid_input"),
        ({"display_name": "A", "is_active": False}, "invalid_input"),
        ({"display_name": "A", "email_verified": True}, "invalid_input"),
        ({}, "invalid_input"),
        ({"phone": "abc"}, "invalid_phone"),
        ({"phone": "+1 (555) 0100"}, "invalid_phone"),
        ({"phone": "123"}, "invalid_phone"),
        ({"phone": 5550100}, "invalid_input"),
        ({"display_name": "n" * 65}, "invalid_input"),
        ({"display_name": "a\u0007b"}, "invalid_input"),
        ({"display_name": "a\nb"}, "invalid_input"),
        ({"display_name": 7}, "invalid_input"),
        ({"display_name": ["A"]}, "invalid_input"),
    ],
    ids=[
        "email",
        "is_active",
        "email_verified",
        "empty-object",
        "letters",
        "brackets",
        "short",
        "number",
        "65-chars",
        "bell",
        "newline",
        "name-number",
        "name-list",
    ],
)
def test_patch_refuses_bad_input(
    server: Server, mail: MailSink, body: dict[str, Any], code: str
) -> None:
    """Unknown keys, empty body, bad phone, long or unprintable name: 400; nothing changes."""
    email, password = register(server, mail, display_name="Keep", phone=random_phone()[1])
    browser = signed_in(server, email, password)
    before = me(browser)
    assert_error(patch_me(browser, body), 400, code)
    assert me(browser) == before


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        (b"", "application/json", 400),
        (b"   ", "application/json", 400),
        (b"{bad", "application/json", 400),
        (b"[]", "application/json", 400),
        (b"null", "application/json", 400),
        (b'{"display_name": "A"}', "text/plain", 415),
        (b'{"display_name": "A"}', None, 415),
    ],
    ids=["empty", "blank", "broken", "array", "null", "text-plain", "no-content-type"],
)
def test_patch_refuses_bodies_that_are_not_objects(
    server: Server, mail: MailSink, raw: bytes, content_type: str | None, status: int
) -> None:
    """An empty, malformed or non-JSON body: 400 or 415, never a change nor a 5xx."""
    email, password = register(server, mail, display_name="Keep")
    browser = signed_in(server, email, password)
    headers = {"Content-Type": content_type} if content_type else {}
    answer = browser.request("PATCH", "/auth/me", body=raw, headers=headers)
    assert_error(answer, status, ("invalid_input", "invalid_json", "unsupported_media_type"))
    assert me(browser)["display_name"] == "Keep"


def test_patch_requires_login(server: Server) -> None:
    """No session, or a made-up one: 401."""
    anonymous = server.client()
    assert patch_me(anonymous, {"display_name": "X"}).json() == UNAUTHORIZED
    anonymous.cookies["cc_auth"] = secrets.token_urlsafe(32)
    answer = patch_me(anonymous, {"display_name": "X"})
    assert answer.status == 401 and answer.json() == UNAUTHORIZED


def test_patch_phone_of_another_account(server: Server, mail: MailSink) -> None:
    """Another account's phone (in any spelling): 409 phone_taken; that account, and this
    one, are untouched; its own present phone is fine."""
    digits, phone = random_phone()
    other_email, other_password = register(server, mail, phone=phone, display_name="Other")
    other = signed_in(server, other_email, other_password)
    other_before = me(other)
    own_digits, own_phone = random_phone()
    email, password = register(server, mail, phone=own_phone)
    browser = signed_in(server, email, password)

    for spelling in (phone, "+" + digits, f"+{digits[:4]}-{digits[4:]}"):
        answer = patch_me(browser, {"phone": spelling, "display_name": "Thief"})
        assert_error(answer, 409, "phone_taken")
    user = me(browser)
    assert user["phone"] == "+" + own_digits and user["display_name"] is None
    assert me(other) == other_before
    assert patch_me(browser, {"phone": own_phone}).status == 200
    assert patch_me(browser, {"display_name": "Mine"}).status == 200
    assert me(other) == other_before
    assert stranger(server).login("+" + digits, other_password).status == 200


def test_patch_reaches_every_session_at_once(
    server: Server, mail: MailSink, request: pytest.FixtureRequest
) -> None:
    """A second session of the account, already cached (with Redis), shows the new values
    at its next request; a session ended before stays ended; another user is unaffected."""
    email, password = register(server, mail, display_name="Before")
    first, second, ended = (signed_in(server, email, password) for _ in range(3))
    bob, bob_password = register(server, mail, display_name="Bob")
    bob_browser = signed_in(server, bob, bob_password)
    bob_before = me(bob_browser)
    assert me(second)["display_name"] == "Before"  # fills the cache
    assert me(ended)["display_name"] == "Before"
    assert ended.post("/auth/logout").status == 200
    redis_key = None
    if server.setup == "postgres":
        rdb: RedisDb = request.getfixturevalue("redis_db")
        session_hash = hashlib.sha256(second.cookies["cc_auth"].encode()).hexdigest()
        redis_key = f"{server.env['REDIS_KEY_PREFIX']}sess:{session_hash}"
        assert json.loads(rdb.client.get(redis_key))["display_name"] == "Before"

    digits, phone = random_phone()
    answer = patch_me(first, {"display_name": "After", "phone": phone})
    assert answer.status == 200, answer
    user = me(second)
    assert user["display_name"] == "After" and user["phone"] == "+" + digits
    assert user == answer.json()["user"]
    assert_error(ended.me(), 401, "unauthorized")
    assert me(bob_browser) == bob_before
    if redis_key is not None:
        cached = json.loads(rdb.client.get(redis_key))
        assert cached["display_name"] == "After" and cached["phone"] == "+" + digits


# -- the audit log ------------------------------------------------------------------------


def test_audit_rows_of_the_flows(server: Server, mail: MailSink) -> None:
    """Register, verify, profile, change of address: one row each, with this browser's
    address, agent and request id; no row anywhere holds a token or a password."""
    agent = "audit-agent/1.0"
    address = new_ip()
    browser = server.client({"User-Agent": agent, "X-Forwarded-For": address})
    email, password = random_email(), strong_password()
    wrong_password = "wrong-" + strong_password()
    assert browser.register(email, password).status == 201
    verify_token = link_token(mails_with(mail, email, VERIFY_SUBJECT)[0])
    assert browser.login(email, password).status == 200
    verified = verify(browser, verify_token)
    assert verified.json() == OK
    digits, phone = random_phone()
    assert patch_me(browser, {"phone": phone, "display_name": "Audit"}).status == 200
    new_email = random_email()
    assert_uniform_401(change_email(browser, wrong_password, new_email))
    change_token = request_change(server, mail, browser, password, new_email)
    changed = verify(browser, change_token)
    assert changed.json() == OK

    rows = sql_rows(
        server,
        "SELECT event, detail, ip, user_agent, request_id FROM auth_events"
        " WHERE user_id = %s ORDER BY id",
        (me(browser)["id"],),
    )
    assert [row["event"] for row in rows] == [
        "register",
        "verification_sent",
        "login_ok",
        "email_verified",
        "profile_updated",
        "password_check_failed",
        "email_change_requested",
        "email_changed",
    ], rows
    by_event = {row["event"]: row for row in rows}
    for row in rows:
        assert row["ip"] == address and row["user_agent"] == agent, row
        assert re.fullmatch(r"[0-9a-f-]{36}", row["request_id"]), row
    assert by_event["email_verified"]["request_id"] == verified.header("X-Request-ID")
    assert by_event["email_changed"]["request_id"] == changed.header("X-Request-ID")
    assert by_event["profile_updated"]["detail"] == "fields=display_name,phone"
    assert by_event["password_check_failed"]["detail"] == "action=email_change"
    masked = f"to={new_email[0]}***@example.com"
    assert by_event["email_change_requested"]["detail"] == masked
    assert by_event["email_changed"]["detail"].startswith(masked)

    secrets_seen = [
        verify_token,
        change_token,
        password,
        wrong_password,
        browser.cookies["cc_auth"],
    ]
    everything = sql_rows(server, "SELECT * FROM auth_events")
    for row in everything:
        text = " ".join(str(value) for value in row.values())
        for secret in secrets_seen:
            assert secret not in text, (secret, row)
    assert digits not in " ".join(str(r["detail"]) for r in rows)
