"""Password recovery and account mail, through a real SMTP server on loopback."""

from __future__ import annotations

import concurrent.futures
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import SETUPS, ServerFactory, shared_server
from tests.helpers import (
    HIGH_LIMITS,
    INVALID_CREDENTIALS,
    Server,
    assert_error,
    logged,
    random_email,
    sql_rows,
    strong_password,
    wait_until,
)
from tests.mailsink import MailSink, make_self_signed_cert

SITE = {
    "SITE_NAME": "Acme Chat",
    "MAIL_SENDER_NAME": "Acme Support",
    "MAIL_FROM": "support@acme.example",
    "FRONTEND_BASE_URL": "https://acme.example/app",
    "MAIL_RETRIES": "1",
}


@pytest.fixture(scope="module", params=SETUPS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sink: MailSink
) -> Iterator[Server]:
    """A server per setup that mails to the sink."""
    yield from shared_server(request, tmp_path_factory, {**HIGH_LIMITS, **SITE, **sink.env()})


def sql_dump(server: Server) -> str:
    """Every row of every table, as text."""
    tables = ("users", "credentials", "sessions", "password_resets")
    return repr([sql_rows(server, f"SELECT * FROM {table}") for table in tables])


def new_account(server: Server, mail: MailSink) -> tuple[str, str]:
    """Register a user, wait for the welcome mail; (email, password)."""
    email, password = random_email(), strong_password()
    assert server.client().register(email, password).status == 201
    mail.wait_for(email)
    return email, password


def request_reset(server: Server, mail: MailSink, email: str, count: int = 1) -> str:
    """POST forgot and return the token of the newest reset mail."""
    answer = server.client().post("/auth/password/forgot", {"identifier": email.upper()})
    assert answer.status == 200 and answer.json() == {"ok": True}, answer
    resets = [m for m in mail.wait_for(email, count + 1) if "Reset" in m.message["Subject"]]
    assert len(resets) == count, [m.message["Subject"] for m in mail.to(email)]
    return resets[-1].reset_token()


def test_welcome_mail_headers_and_parts(server: Server, mail: MailSink) -> None:
    email, _ = new_account(server, mail)
    (received,) = mail.to(email)
    message = received.message
    assert received.mail_from == "support@acme.example"
    assert received.rcpt_tos == [email]
    assert message["From"] == "Acme Support <support@acme.example>"
    assert message["To"] == email
    assert message["Subject"] == "Welcome to Acme Chat"
    assert message["Date"] and message["Message-ID"].endswith("@acme.example>")
    assert "Acme Chat" in received.text()
    assert "<html" in received.html()


def test_reset_flow_end_to_end(server: Server, mail: MailSink) -> None:
    email, old_password = new_account(server, mail)
    first, second = server.client(), server.client()
    assert first.login(email, old_password).status == 200
    assert second.login(email, old_password).status == 200

    token = request_reset(server, mail, email)
    reset_mail = next(m for m in mail.to(email) if "Reset" in m.message["Subject"])
    assert reset_mail.message["Subject"] == "Reset your Acme Chat password"
    assert f"https://acme.example/app/reset_password?token={token}" in reset_mail.text()
    assert "15 minutes" in reset_mail.text()
    assert len(token) >= 43  # 256 bits, URL-safe base64

    new_password = strong_password()
    answer = server.client().post(
        "/auth/password/reset", {"token": token, "password": new_password}
    )
    assert answer.status == 200, answer
    assert answer.json() == {"ok": True, "revoked_sessions": 2}
    assert first.me().status == 401
    assert second.me().status == 401
    assert server.client().login(email, old_password).json() == INVALID_CREDENTIALS
    assert server.client().login(email, new_password).status == 200

    changed = mail.wait_for(email, 3)[-1]
    assert changed.message["Subject"] == "Your Acme Chat password was changed"

    again = server.client().post("/auth/password/reset", {"token": token, "password": new_password})
    body = assert_error(again, 400, "invalid_token")
    assert body["error"] == "Token invalid or expired"

    logged(server, f"rid={again.header('X-Request-ID')}")
    assert token not in server.log_text()
    assert token not in sql_dump(server)


def test_reset_weak_password_keeps_token(server: Server, mail: MailSink) -> None:
    email, _ = new_account(server, mail)
    token = request_reset(server, mail, email)
    weak = server.client().post("/auth/password/reset", {"token": token, "password": "short"})
    assert assert_error(weak, 400, "weak_password")["error"] == "Invalid token or weak password"
    good = server.client().post(
        "/auth/password/reset", {"token": token, "password": strong_password()}
    )
    assert good.status == 200, good


def test_new_token_voids_the_older_one(server: Server, mail: MailSink) -> None:
    email, _ = new_account(server, mail)
    older = request_reset(server, mail, email, 1)
    newer = request_reset(server, mail, email, 2)
    assert older != newer
    stale = server.client().post(
        "/auth/password/reset", {"token": older, "password": strong_password()}
    )
    assert_error(stale, 400, "invalid_token")
    fresh = server.client().post(
        "/auth/password/reset", {"token": newer, "password": strong_password()}
    )
    assert fresh.status == 200, fresh


def test_expired_token_is_refused(server: Server, mail: MailSink) -> None:
    email, _ = new_account(server, mail)
    token = request_reset(server, mail, email)
    sql_rows(server, "UPDATE password_resets SET expires_at = created_at")
    answer = server.client().post(
        "/auth/password/reset", {"token": token, "password": strong_password()}
    )
    assert_error(answer, 400, "invalid_token")


def test_concurrent_double_use_exactly_one_wins(server: Server, mail: MailSink) -> None:
    email, _ = new_account(server, mail)
    token = request_reset(server, mail, email)
    passwords = [strong_password() for _ in range(6)]

    def use(password: str) -> int:
        body = {"token": token, "password": password}
        return server.client().post("/auth/password/reset", body).status

    with concurrent.futures.ThreadPoolExecutor(len(passwords)) as pool:
        statuses = list(pool.map(use, passwords))
    assert sorted(statuses) == [200] + [400] * (len(passwords) - 1), statuses
    winners = [p for p in passwords if server.client().login(email, p).status == 200]
    assert len(winners) == 1


def test_forgot_unknown_address_sends_nothing(server: Server, mail: MailSink) -> None:
    unknown = random_email()
    answer = server.client().post("/auth/password/forgot", {"identifier": unknown})
    assert answer.status == 200 and answer.json() == {"ok": True}
    wait_until(
        lambda: "password reset: no active account" in server.log_text(),
        10,
        what="the lookup's log line",
    )
    assert mail.to(unknown) == []


def test_forgot_bad_input(server: Server) -> None:
    client = server.client()
    assert_error(client.post("/auth/password/forgot", {"identifier": 123}), 400, "invalid_input")
    assert_error(client.post("/auth/password/forgot", {}), 400, "invalid_input")
    odd = client.post("/auth/password/forgot", {"identifier": "not an address"})
    assert odd.status == 200 and odd.json() == {"ok": True}
    assert_error(client.post("/auth/password/reset", {"token": 5}), 400, "invalid_input")


def test_change_password(server: Server, mail: MailSink) -> None:
    email, old_password = new_account(server, mail)
    current, other = server.client(), server.client()
    assert current.login(email, old_password).status == 200
    assert other.login(email, old_password).status == 200

    wrong = current.post(
        "/auth/password/change", {"current_password": "nope-123", "new_password": "x" * 9 + "1"}
    )
    assert wrong.status == 401 and wrong.json() == INVALID_CREDENTIALS
    weak = current.post(
        "/auth/password/change", {"current_password": old_password, "new_password": "short"}
    )
    assert_error(weak, 400, "weak_password")

    new_password = strong_password()
    answer = current.post(
        "/auth/password/change",
        {"current_password": old_password, "new_password": new_password},
    )
    assert answer.status == 200, answer
    assert answer.json() == {"ok": True, "revoked_sessions": 1}
    assert current.me().status == 200
    assert other.me().status == 401
    assert server.client().login(email, new_password).status == 200
    subjects = [m.message["Subject"] for m in mail.wait_for(email, 2)]
    assert "Your Acme Chat password was changed" in subjects


def test_change_password_requires_login(server: Server) -> None:
    answer = server.client().post(
        "/auth/password/change", {"current_password": "a", "new_password": "b"}
    )
    assert_error(answer, 401, "unauthorized")


def test_wrong_current_password_counts_toward_login_limit(
    make_server: ServerFactory, sink: MailSink
) -> None:
    sink.clear()
    server = make_server.start(
        "embedded", {**HIGH_LIMITS, **sink.env(), "RATE_LOGIN_IDENTIFIER": "3/600"}
    )
    email, password = random_email(), strong_password()
    client = server.client()
    assert client.register(email, password).status == 201
    assert client.login(email, password).status == 200
    for _ in range(3):  # attempts 1 to 3, on this session's own key
        wrong = client.post(
            "/auth/password/change",
            {"current_password": "wrong-pass-1", "new_password": strong_password()},
        )
        assert wrong.status == 401
    right = client.post(
        "/auth/password/change", {"current_password": password, "new_password": strong_password()}
    )
    assert right.status == 401 and right.json() == INVALID_CREDENTIALS
    # Since issue 12 point 2 they count as a device's do, on their own key: a session's
    # guesses stop that session, and others' failed logins cannot stop its owner.
    assert server.client().login(email, password).status == 200
    owner = server.client()
    assert owner.login(email, password).status == 200
    for _ in range(4):
        assert server.client().login(email, "wrong-pass-2").status == 401
    changed = owner.post(
        "/auth/password/change", {"current_password": password, "new_password": strong_password()}
    )
    assert changed.status == 200, changed


def test_forgot_rate_limit_per_identifier(make_server: ServerFactory, sink: MailSink) -> None:
    sink.clear()
    server = make_server.start(
        "embedded", {**HIGH_LIMITS, **sink.env(), "RATE_FORGOT_IDENTIFIER": "1/3600"}
    )
    email, password = random_email(), strong_password()
    assert server.client().register(email, password).status == 201
    for _ in range(3):
        answer = server.client().post("/auth/password/forgot", {"identifier": email})
        assert answer.status == 200 and answer.json() == {"ok": True}
    wait_until(lambda: server.log_text().count("over the rate limit") == 2, 10, what="two limited")
    wait_until(lambda: len(sink.to(email)) == 2, 10, what="welcome + one reset mail")


def test_debug_token_in_development(make_server: ServerFactory) -> None:
    server = make_server.start("embedded", {**HIGH_LIMITS, "DEBUG_RETURN_RESET_TOKEN": "1"})
    email, password = random_email(), strong_password()
    assert server.client().register(email, password).status == 201
    answer = server.client().post("/auth/password/forgot", {"identifier": email}).json()
    assert answer["ok"] is True and answer["debug_ttl"] == 900
    reset = server.client().post(
        "/auth/password/reset", {"token": answer["debug_token"], "password": strong_password()}
    )
    assert reset.status == 200, reset
    unknown = server.client().post("/auth/password/forgot", {"identifier": random_email()})
    assert unknown.json() == {"ok": True}
    # Without SMTP_HOST the mail goes to the log, its token redacted.
    logged(server, "reset_password?token=[redacted]")
    logged(server, f"rid={unknown.header('X-Request-ID')}")
    assert answer["debug_token"] not in server.log_text()


def test_starttls_with_private_ca(make_server: ServerFactory, tmp_path: Any) -> None:
    cert, key = make_self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    tls_sink = MailSink(tls_context=context)
    try:
        trusted = make_server.start(
            "embedded",
            {**HIGH_LIMITS, **tls_sink.env(), "SMTP_TLS": "1", "SMTP_CA_FILE": str(cert)},
        )
        email = random_email()
        assert trusted.client().register(email, strong_password()).status == 201
        tls_sink.wait_for(email)
        assert tls_sink.tls_used == [True]

        untrusted = make_server.start(
            "embedded", {**HIGH_LIMITS, **tls_sink.env(), "SMTP_TLS": "1", "MAIL_RETRIES": "0"}
        )
        other = random_email()
        assert untrusted.client().register(other, strong_password()).status == 201
        wait_until(
            lambda: (
                "mail welcome to" in untrusted.log_text() and "TLS failed" in untrusted.log_text()
            ),
            10,
            what="the TLS failure in the log",
        )
        assert tls_sink.to(other) == []
    finally:
        tls_sink.stop()


def test_smtp_down_api_still_answers(make_server: ServerFactory, tmp_path: Any) -> None:
    from tests.helpers import free_port

    closed = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(free_port()), "SMTP_TLS": "0"}
    server = make_server.start("embedded", {**HIGH_LIMITS, **closed, "MAIL_RETRIES": "1"})
    email, password = random_email(), strong_password()
    client = server.client()
    assert client.register(email, password).status == 201
    forgot = client.post("/auth/password/forgot", {"identifier": email})
    assert forgot.status == 200 and forgot.json() == {"ok": True}
    wait_until(
        lambda: server.log_text().count("failed after 2 attempt(s)") >= 2,
        15,
        what="both mail failures logged",
    )
    assert "token=" not in server.log_text()


def test_smtp_refusals_retry_then_give_up(make_server: ServerFactory, sink: MailSink) -> None:
    sink.clear()
    server = make_server.start("embedded", {**HIGH_LIMITS, **sink.env(), "MAIL_RETRIES": "1"})
    sink.refuse_next("451 4.3.0 try again later")
    email = random_email()
    assert server.client().register(email, strong_password()).status == 201
    sink.wait_for(email)
    wait_until(lambda: "sent (attempt 2)" in server.log_text(), 10, what="the retry's log line")

    sink.refuse_next("550 5.7.1 rejected")
    other = random_email()
    assert server.client().register(other, strong_password()).status == 201
    wait_until(
        lambda: "failed after 1 attempt(s): server answered 550" in server.log_text(),
        10,
        what="the permanent failure logged",
    )
    assert sink.to(other) == []
