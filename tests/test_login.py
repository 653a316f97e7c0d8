"""POST /auth/login, GET /auth/me and POST /auth/logout: cookies and sessions."""

from __future__ import annotations

import re
import statistics

from tests.conftest import ServerFactory
from tests.helpers import (
    HIGH_LIMITS,
    INVALID_CREDENTIALS,
    UNAUTHORIZED,
    Server,
    assert_error,
    random_email,
    random_phone,
    register_and_login,
    strong_password,
    wait_until,
)


def test_login_sets_session_cookie_with_safe_attributes(server: Server) -> None:
    """Login answers 200 {"ok": true} and an HttpOnly, SameSite=Lax, Path=/ cookie."""
    client = server.client()
    email, password = random_email(), strong_password()
    assert client.register(email, password).status == 201
    response = client.login(email, password)
    assert response.status == 200, response
    assert response.json().get("ok") is True
    cookie = response.cookie("cc_auth")
    assert cookie is not None, response.headers.get_all("Set-Cookie")
    value, attrs = cookie
    assert len(value) >= 22, "a session id needs at least 128 bits"
    assert "httponly" in attrs
    assert attrs.get("samesite", "").lower() == "lax"
    assert attrs.get("path") == "/"
    assert attrs.get("max-age") == "604800"
    assert "secure" not in attrs


def test_cookie_secure_and_configured_name_and_ttl(make_server: ServerFactory) -> None:
    """COOKIE_SECURE=1 adds Secure; AUTH_COOKIE_NAME and SESSION_TTL_SECONDS are honoured."""
    srv = make_server.start(
        "embedded",
        {"COOKIE_SECURE": "1", "AUTH_COOKIE_NAME": "my_auth", "SESSION_TTL_SECONDS": "3600"},
    )
    client, _, _ = register_and_login(srv)
    assert client.me().status == 200
    assert "my_auth" in client.cookies and "cc_auth" not in client.cookies
    login = srv.client()
    _, email, password = register_and_login(srv)
    response = login.login(email, password)
    cookie = response.cookie("my_auth")
    assert cookie is not None, response.headers.get_all("Set-Cookie")
    _, attrs = cookie
    assert "secure" in attrs
    assert "httponly" in attrs
    assert attrs.get("max-age") == "3600"


def test_login_by_phone_in_another_format(server: Server) -> None:
    """A phone number logs in, however it is spaced or hyphenated."""
    client = server.client()
    digits, formatted = random_phone()
    email, password = random_email(), strong_password()
    assert client.register(email, password, phone=formatted).status == 201
    assert client.login(f"+{digits}", password).status == 200
    assert client.me().json()["user"]["email"] == email
    spaced = f"+{digits[0]} {digits[1:4]}-{digits[4:]}"
    assert server.client().login(spaced, password).status == 200


def test_login_email_is_case_insensitive(server: Server) -> None:
    """The identifier is trimmed and lower-cased like at registration."""
    client = server.client()
    email, password = random_email(), strong_password()
    assert client.register(email, password).status == 201
    assert client.login(f"  {email.upper()} ", password).status == 200
    assert client.me().status == 200


def test_login_failures_are_uniform(server: Server) -> None:
    """Unknown account, wrong password and wrong case of password answer the same bytes."""
    client = server.client()
    email, password = random_email(), strong_password()
    assert client.register(email, password).status == 201
    answers = [
        client.login(random_email(), password),
        client.login(email, password + "x"),
        client.login(email, password.swapcase()),
        client.login("+15550000000", password),
    ]
    for response in answers:
        assert response.status == 401, response
        assert response.json() == INVALID_CREDENTIALS
        assert response.body == answers[0].body
        assert response.cookie("cc_auth") is None
    assert client.me().status == 401


def test_unknown_account_costs_as_much_time_as_a_wrong_password(
    make_server: ServerFactory,
) -> None:
    """Unknown accounts are not answered measurably faster than wrong passwords."""
    # Costlier than the suite's cheap parameters, so that hashing dominates the latency.
    srv = make_server.start(
        "embedded", {**HIGH_LIMITS, "ARGON2_TIME_COST": "4", "ARGON2_MEMORY_KIB": "16384"}
    )
    client = srv.client()
    email, password = random_email(), strong_password()
    assert client.register(email, password).status == 201
    unknown, wrong = [], []
    for _ in range(8):
        response = client.login(random_email(), password)
        assert response.status == 401
        unknown.append(response.elapsed)
        response = client.login(email, "wrong-" + password)
        assert response.status == 401
        wrong.append(response.elapsed)
    assert statistics.median(wrong) > 0.01, "hashing should dominate the wrong-password time"
    assert statistics.median(unknown) >= 0.5 * statistics.median(wrong), (unknown, wrong)


def test_every_login_gets_a_fresh_session_id(server: Server) -> None:
    """Two logins by two clients give two different, both valid, session ids."""
    _, email, password = register_and_login(server)
    first, second = server.client(), server.client()
    assert first.login(email, password).status == 200
    assert second.login(email, password).status == 200
    assert first.cookies["cc_auth"] != second.cookies["cc_auth"]
    assert first.me().status == 200
    assert second.me().status == 200


def test_login_again_revokes_the_cookie_sent(server: Server) -> None:
    """Logging in with a session cookie revokes that session and issues a new id."""
    client, email, password = register_and_login(server)
    old = client.cookies["cc_auth"]
    response = client.login(email, password)
    assert response.status == 200
    new = client.cookies["cc_auth"]
    assert new != old
    replay = server.client()
    replay.cookies["cc_auth"] = old
    assert_error(replay.me(), 401, "unauthorized")
    assert client.me().status == 200


def test_client_chosen_cookie_is_not_adopted(server: Server) -> None:
    """A cookie value the client picked before login never becomes a session id."""
    _, email, password = register_and_login(server)
    chosen = "attacker-chosen-" + "a" * 32
    client = server.client()
    client.cookies["cc_auth"] = chosen
    response = client.login(email, password)
    assert response.status == 200
    cookie = response.cookie("cc_auth")
    assert cookie is not None and cookie[0] != chosen
    fixed = server.client()
    fixed.cookies["cc_auth"] = chosen
    assert fixed.me().status == 401
    assert client.me().status == 200


def test_me_returns_the_user(server: Server) -> None:
    """GET /auth/me answers the logged-in user with the contract's fields."""
    digits, formatted = random_phone()
    client, email, _ = register_and_login(server, phone=formatted, display_name="Me Myself")
    response = client.me()
    assert response.status == 200, response
    body = response.json()
    assert body["ok"] is True
    user = body["user"]
    assert {"id", "uid", "email", "phone", "display_name", "is_active"} <= set(user)
    assert user["email"] == email
    assert re.sub(r"\D", "", user["phone"]) == digits
    assert user["display_name"] == "Me Myself"
    assert user["is_active"] is True
    assert "password" not in str(user).lower() and "hash" not in str(user).lower()


def test_me_without_cookie_is_401(server: Server) -> None:
    """No cookie: 401 {"ok": false, "error": "Unauthorized"}."""
    response = server.client().me()
    assert_error(response, 401, "unauthorized")
    assert response.json() == UNAUTHORIZED


def test_me_with_bogus_cookie_is_401(server: Server) -> None:
    """An unknown or malformed session id is 401, not a 5xx."""
    for bogus in ["nope", "x" * 43, "%00%ff", "a" * 5000]:
        client = server.client()
        client.cookies["cc_auth"] = bogus
        response = client.me()
        assert response.json() == UNAUTHORIZED, (bogus[:20], response)


def test_logout_ends_the_session(server: Server) -> None:
    """Logout answers 200, expires the cookie, and the old id stops working."""
    client, _, _ = register_and_login(server)
    old = client.cookies["cc_auth"]
    response = client.post("/auth/logout")
    assert response.status == 200, response
    assert response.json().get("ok") is True
    cookie = response.cookie("cc_auth")
    assert cookie is not None, response.headers.get_all("Set-Cookie")
    assert cookie[1].get("max-age") == "0"
    replay = server.client()
    replay.cookies["cc_auth"] = old
    assert_error(replay.me(), 401, "unauthorized")


def test_logout_without_session_is_200(server: Server) -> None:
    """Logout without a cookie, or with a bogus one, still answers 200."""
    assert server.client().post("/auth/logout").status == 200
    assert server.client().post("/auth/logout", {}).status == 200
    client = server.client()
    client.cookies["cc_auth"] = "bogus-session-id"
    response = client.post("/auth/logout")
    assert response.status == 200
    assert response.json().get("ok") is True


def test_logout_only_ends_its_own_session(server: Server) -> None:
    """Another session of the same user survives a logout."""
    first, email, password = register_and_login(server)
    second = server.client()
    assert second.login(email, password).status == 200
    assert first.post("/auth/logout").status == 200
    assert first.me().status == 401
    assert second.me().status == 200


def test_logs_hold_no_password_or_session_id(server: Server) -> None:
    """Request logs never carry the password or the session cookie value."""
    client = server.client()
    email, password = random_email(), "Secret-" + strong_password()
    assert client.register(email, password).status == 201
    assert client.login(email, password).status == 200
    assert client.login(email, password + "-wrong").status == 401
    session_id = client.cookies["cc_auth"]
    request_id = client.me().header("X-Request-ID")
    wait_until(
        lambda: any(f"rid={request_id}" in line for line in server.logs),
        timeout=5,
        what="the /auth/me log line",
    )
    text = server.log_text()
    assert password not in text
    assert session_id not in text
