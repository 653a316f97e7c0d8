"""Issue 12 against real servers: history ownership (3), the logout race (5), reset links (6),
the password policy (7) and email addresses (8)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SETUPS, RedisDb, ServerFactory, shared_server
from tests.fakeprovider import FakeProvider, echo_text
from tests.helpers import (
    HIGH_LIMITS,
    INVALID_CREDENTIALS,
    UNAUTHORIZED,
    Client,
    Response,
    Server,
    assert_error,
    base_env,
    random_email,
    random_hex,
    run_cli,
    strong_password,
)
from tests.mailsink import MailSink
from tests.test_rules_unit import INVALID_EMAILS

CHAT = "/deepseek_chat"
HIGH_CHAT = {"RATE_CHAT_VISITOR": "100000/60", "RATE_CHAT_IP": "100000/60"}
SECRET_MESSAGE = "my card PIN is 4321"
# A made-up value of the shape the old server adopted (token_urlsafe(24)); fixed, so that
# every xdist worker collects the same test ids.
OLD_SHAPE_ID = "q3Lx9vT0bWk2YfN7sR1dHc8uJp4ZaE6g"
RACE_TRIALS = 20
RACE_PROBES = 8


def site_env(provider: FakeProvider, sink: MailSink, **extra: str) -> dict[str, str | None]:
    """Settings of a server that chats with the fake provider and mails to the sink."""
    return {
        **HIGH_LIMITS,
        **HIGH_CHAT,
        **sink.env(),
        "MAIL_RETRIES": "0",
        "DEEPSEEK_API_KEY": "sk-test-deepseek-0123",
        "DEEPSEEK_BASE_URL": provider.url(),
        "CHAT_READ_TIMEOUT": "5",
        "CHAT_CONNECT_TIMEOUT": "2",
        "MAX_HISTORY": "4",
        "DEBUG_RETURN_RESET_TOKEN": "1",
        **extra,
    }


@pytest.fixture(scope="module", params=SETUPS)
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    provider: FakeProvider,
    sink: MailSink,
) -> Iterator[Server]:
    """A server per setup with the fake provider, the mail sink and debug reset tokens."""
    yield from shared_server(request, tmp_path_factory, site_env(provider, sink))


# -- helpers ---------------------------------------------------------------------------------


def new_account(server: Server, email: str | None = None) -> tuple[str, str]:
    """Register a fresh account; (email, password)."""
    email, password = email or random_email(), strong_password()
    answer = server.client().register(email, password)
    assert answer.status == 201, answer
    return email, password


def logged_in(server: Server, email: str, password: str, client: Client | None = None) -> Client:
    """A client (a new one, or the given browser) logged in to the account."""
    client = client or server.client()
    answer = client.login(email, password)
    assert answer.status == 200, answer
    return client


def say(client: Client, fake: FakeProvider, message: str) -> list[tuple[str, str]]:
    """One complete chat round; the (role, content) pairs the provider received for it."""
    before = len(fake.requests)
    answer = client.post(CHAT, {"message": message})
    assert answer.status == 200, answer
    lines = [json.loads(line) for line in answer.body.decode("utf-8").splitlines()]
    assert lines and lines[-1].get("done") is True, lines
    assert "".join(line.get("text", "") for line in lines) == echo_text(message), lines
    requests = fake.requests
    assert len(requests) == before + 1, requests
    turns = requests[-1].turns()
    assert turns[0][0] == "system", turns
    return turns[1:]


def rounds(*messages: str, then: str) -> list[tuple[str, str]]:
    """The turns after the system prompt for `then` after these rounds (each echoed)."""
    expected: list[tuple[str, str]] = []
    for message in messages:
        expected += [("user", message), ("assistant", echo_text(message))]
    return [*expected, ("user", then)]


def visitor_cookie(response: Response) -> str | None:
    """The value of a cc_app cookie the answer sets (not one it expires), or None."""
    cookie = response.cookie("cc_app")
    if cookie is None or cookie[0] == "" or cookie[1].get("max-age") == "0":
        return None
    return cookie[0]


def expires_visitor_cookie(response: Response) -> bool:
    """True if the answer expires cc_app (Max-Age=0)."""
    cookie = response.cookie("cc_app")
    return cookie is not None and cookie[1].get("max-age") == "0"


def chat_as(server: Server, fake: FakeProvider, cc_app: str, message: str) -> tuple[Response, Any]:
    """A chat from a new browser that sends this cc_app; (answer, turns after the system)."""
    client = server.client()
    client.cookies["cc_app"] = cc_app
    before = len(fake.requests)
    answer = client.post(CHAT, {"message": message})
    assert answer.status == 200, answer
    requests = fake.requests
    assert len(requests) == before + 1, requests
    return answer, requests[-1].turns()[1:]


def reset_token(server: Server, email: str) -> str:
    """A reset token for the account (DEBUG_RETURN_RESET_TOKEN=1)."""
    answer = server.client().post("/auth/password/forgot", {"identifier": email})
    assert answer.status == 200, answer
    token = answer.json().get("debug_token")
    assert isinstance(token, str) and token, answer
    return token


def reset(server: Server, token: str, password: str) -> Response:
    """POST /auth/password/reset."""
    return server.client().post("/auth/password/reset", {"token": token, "password": password})


def cli(server: Server, *args: str) -> None:
    """Run a cloudchat.py command on the server's data; it must succeed."""
    done = run_cli(list(args), server.env, server.workdir)
    assert done.returncode == 0, (done.stdout, done.stderr)


def weak(response: Response, rule: str) -> None:
    """A 400 weak_password whose message names the rule (a word of it, any case)."""
    body = assert_error(response, 400, "weak_password")
    assert rule in body["error"].lower(), body


# -- point 3: chat history belongs to the account, visitor ids only from the server ----------


def shared_browser_scenario(server: Server, fake: FakeProvider) -> None:
    """Alice chats a secret and logs out; the next people on that browser never send it."""
    alice, bob = new_account(server), new_account(server)
    browser = logged_in(server, *alice)
    assert say(browser, fake, SECRET_MESSAGE) == rounds(then=SECRET_MESSAGE)
    assert browser.post("/auth/logout").status == 200
    logged_in(server, *bob, client=browser)
    assert say(browser, fake, "hello, what did I tell you?") == rounds(
        then="hello, what did I tell you?"
    )
    assert all("4321" not in content for r in fake.requests[1:] for _, content in r.turns())


def test_next_user_on_a_shared_browser_does_not_get_the_history(
    server: Server, fake: FakeProvider
) -> None:
    """Point 3: after Alice's logout, Bob on the same browser never sends her message."""
    shared_browser_scenario(server, fake)


@pytest.mark.parametrize("setup", SETUPS)
def test_shared_browser_with_chat_require_auth(
    make_server: ServerFactory, fake: FakeProvider, sink: MailSink, setup: str
) -> None:
    """Point 3: the same with CHAT_REQUIRE_AUTH=1."""
    srv = make_server.start(setup, site_env(fake, sink, CHAT_REQUIRE_AUTH="1"))
    shared_browser_scenario(srv, fake)


def test_anonymous_chat_after_logout_starts_afresh(server: Server, fake: FakeProvider) -> None:
    """Point 3: after a logout the same browser chats anonymously without the account's rounds."""
    browser = logged_in(server, *new_account(server))
    say(browser, fake, SECRET_MESSAGE)
    assert browser.post("/auth/logout").status == 200
    assert say(browser, fake, "anyone there?") == rounds(then="anyone there?")


def test_account_history_is_the_same_on_every_device(server: Server, fake: FakeProvider) -> None:
    """Point 3: two devices logged in to one account share one history."""
    account = new_account(server)
    laptop, phone = logged_in(server, *account), logged_in(server, *account)
    assert say(laptop, fake, "from the laptop") == rounds(then="from the laptop")
    assert say(phone, fake, "from the phone") == rounds("from the laptop", then="from the phone")
    assert say(laptop, fake, "laptop again") == rounds(
        "from the laptop", "from the phone", then="laptop again"
    )
    other = logged_in(server, *new_account(server))
    assert say(other, fake, "someone else") == rounds(then="someone else")


@pytest.mark.parametrize(
    "planted",
    ["A" * 32, OLD_SHAPE_ID],
    ids=["AAAA", "random-shape-of-an-old-id"],
)
def test_made_up_visitor_id_is_replaced_never_adopted(
    server: Server, fake: FakeProvider, planted: str
) -> None:
    """Point 3: a cc_app the server did not issue gets a new Set-Cookie; its history is unused."""
    first, turns = chat_as(server, fake, planted, "planted by the attacker")
    issued = visitor_cookie(first)
    assert issued is not None and issued != planted, first.headers
    assert turns == rounds(then="planted by the attacker")

    victim, turns = chat_as(server, fake, planted, "the victim's secret")
    replaced = visitor_cookie(victim)
    assert replaced is not None and replaced not in (planted, issued), victim.headers
    assert turns == rounds(then="the victim's secret")

    _, turns = chat_as(server, fake, planted, "what did the victim say?")
    assert turns == rounds(then="what did the victim say?")


def _tampered(value: str, part: str) -> str:
    """An issued visitor id (random.time.signature) with one part changed."""
    parts = value.split(".")
    index = min({"random": 0, "time": 1, "signature": 2}[part], len(parts) - 1)
    if part == "time" and parts[index].isdigit():
        parts[index] = str(int(parts[index]) + 1)
    else:
        text = parts[index]
        parts[index] = text[:-1] + ("B" if text[-1] == "A" else "A")
    return ".".join(parts)


@pytest.mark.parametrize("part", ["random", "time", "signature"])
def test_issued_visitor_id_is_kept_a_tampered_one_replaced(
    server: Server, fake: FakeProvider, part: str
) -> None:
    """Point 3: the server's own cc_app is kept (no new cookie); one changed in any part is not."""
    browser = server.client()
    say(browser, fake, "first round")
    issued = browser.cookies["cc_app"]
    kept = browser.post(CHAT, {"message": "second round"})
    assert kept.status == 200, kept
    assert kept.cookie("cc_app") is None, kept.headers
    assert fake.requests[-1].turns()[1:] == rounds("first round", then="second round")

    forged = _tampered(issued, part)
    answer, turns = chat_as(server, fake, forged, "with a forged id")
    replaced = visitor_cookie(answer)
    assert replaced is not None and replaced not in (issued, forged), answer.headers
    assert turns == rounds(then="with a forged id")


def test_login_and_logout_expire_the_visitor_id(server: Server, fake: FakeProvider) -> None:
    """Point 3: login and logout answer with cc_app Max-Age=0; a logged-in chat issues none."""
    email, password = new_account(server)
    browser = server.client()
    say(browser, fake, "before login")
    anonymous = browser.cookies["cc_app"]
    login = browser.login(email, password)
    assert login.status == 200, login
    assert expires_visitor_cookie(login), login.headers
    assert "cc_app" not in browser.cookies
    chatted = browser.post(CHAT, {"message": "logged in"})
    assert chatted.status == 200 and chatted.cookie("cc_app") is None, chatted.headers
    assert fake.requests[-1].turns()[1:] == rounds(then="logged in")
    logout = browser.post("/auth/logout")
    assert logout.status == 200, logout
    assert expires_visitor_cookie(logout), logout.headers
    assert say(browser, fake, "after logout") == rounds(then="after logout")
    assert browser.cookies["cc_app"] != anonymous


def test_reset_chat_clears_the_account_history_on_every_device(
    server: Server, fake: FakeProvider
) -> None:
    """Point 3: /reset_chat when logged in clears the account's history on every device."""
    account = new_account(server)
    laptop, phone = logged_in(server, *account), logged_in(server, *account)
    say(laptop, fake, "before the reset")
    answer = phone.post("/reset_chat", {})
    assert answer.status == 200, answer
    assert say(laptop, fake, "after the reset") == rounds(then="after the reset")
    assert say(phone, fake, "phone after") == rounds("after the reset", then="phone after")


# -- point 5: a logout wins against a concurrent cache fill (the Redis cache: postgres) ------


def _cache_key(server: Server, token: str) -> str:
    """The Redis key that caches a session."""
    return f"{server.env['REDIS_KEY_PREFIX']}sess:{hashlib.sha256(token.encode()).hexdigest()}"


def test_logout_wins_over_a_late_cache_fill(make_server: ServerFactory, redis_db: RedisDb) -> None:
    """Point 5: read the session from SQL, log out, then fill the cache late: still 401."""
    import cloudchat

    srv = make_server.start("postgres", HIGH_LIMITS)
    cfg = cloudchat.Config.from_env(dict(srv.env))
    sql, kv = cloudchat.open_sql_store(cfg), cloudchat.open_kv_store(cfg)
    try:
        email, password = new_account(srv)
        client = logged_in(srv, email, password)
        assert client.me().status == 200
        token = client.cookies["cc_auth"]
        key = _cache_key(srv, token)
        id_hash = key.rpartition(":")[2]
        redis_db.client.delete(key)
        idle = cloudchat.dt.timedelta(seconds=cfg.session_idle_seconds)
        found = cloudchat.get_live_session_user(sql, id_hash, idle)  # the request's read
        assert found is not None
        cloudchat.revoke_session(sql, kv, cfg, token)  # the logout in between
        cloudchat._cache_session(cfg, kv, id_hash, found[0], found[1])  # the late fill
        assert client.me().json() == UNAUTHORIZED
        cached = redis_db.client.get(key)
        assert cached is None or email.encode() not in cached, cached
    finally:
        kv.close()
        sql.close()


def test_logout_wins_against_concurrent_requests(
    make_server: ServerFactory, redis_db: RedisDb
) -> None:
    """Point 5: 20 logouts, each among concurrent /auth/me on an empty cache: 401 right after."""
    srv = make_server.start("postgres", {**HIGH_LIMITS, "SESSION_CACHE_SECONDS": "60"})
    email, password = new_account(srv)
    stale: list[tuple[int, str, int]] = []
    with ThreadPoolExecutor(RACE_PROBES) as pool:
        for trial in range(RACE_TRIALS):
            browser = logged_in(srv, email, password)
            token = browser.cookies["cc_auth"]
            assert browser.me().status == 200  # cached
            redis_db.client.delete(_cache_key(srv, token))
            start = threading.Barrier(RACE_PROBES + 1)

            def probe(token: str = token, start: threading.Barrier = start) -> int:
                """One /auth/me with the session, released with the logout."""
                thief = srv.client()
                thief.cookies["cc_auth"] = token
                start.wait(10)
                return thief.me().status

            probes = [pool.submit(probe) for _ in range(RACE_PROBES)]
            start.wait(10)
            assert browser.post("/auth/logout").status == 200
            replay = srv.client()
            replay.cookies["cc_auth"] = token
            right_after = replay.me().status
            statuses = [p.result(10) for p in probes]
            at_the_end = replay.me().status
            assert set(statuses) <= {200, 401}, statuses
            if right_after != 401:
                stale.append((trial, "right after the logout", right_after))
            if at_the_end != 401:
                stale.append((trial, "after every concurrent request", at_the_end))
    assert stale == [], f"a logged-out session still answered: {stale}"


# -- point 6: what ends a reset link ---------------------------------------------------------


def test_password_change_ends_reset_links(server: Server) -> None:
    """Point 6: a reset token issued before a password change no longer works after it."""
    email, password = new_account(server)
    client = logged_in(server, email, password)
    token = reset_token(server, email)
    new_password = strong_password()
    change = client.post(
        "/auth/password/change", {"current_password": password, "new_password": new_password}
    )
    assert change.status == 200, change
    assert_error(reset(server, token, strong_password()), 400, "invalid_token")
    assert server.client().login(email, new_password).status == 200


def test_deactivation_ends_reset_links(server: Server) -> None:
    """Point 6: deactivation ends the account's reset links (they fail after activation too)."""
    email, password = new_account(server)
    token = reset_token(server, email)
    cli(server, "deactivate", email)
    cli(server, "activate", email)
    assert_error(reset(server, token, strong_password()), 400, "invalid_token")
    assert server.client().login(email, password).status == 200


def test_reset_of_a_deactivated_account_does_not_survive_activation(server: Server) -> None:
    """Point 6: deactivate, reset attempt, activate: the attacker's password does not work."""
    email, password = new_account(server)
    token = reset_token(server, email)
    cli(server, "deactivate", email)
    attacker = strong_password()
    assert_error(reset(server, token, attacker), 400, "invalid_token")
    cli(server, "activate", email)
    assert server.client().login(email, attacker).json() == INVALID_CREDENTIALS
    assert server.client().login(email, password).status == 200


# -- point 7: the password policy ------------------------------------------------------------


@pytest.mark.parametrize("password", ["correcthorsebatterystaple", "onlyletterslong"])
def test_no_composition_rule_by_default(server: Server, password: str) -> None:
    """Point 7: a long password of letters only is accepted (no composition rule)."""
    email = random_email()
    answer = server.client().register(email, password)
    assert answer.status == 201, answer
    assert server.client().login(email, password).status == 200


@pytest.mark.parametrize("password", ["PASSWORD", "Password123", "qwertyuiop"])
def test_common_passwords_are_refused_case_insensitively(server: Server, password: str) -> None:
    """Point 7: passwords on the common list are refused in any case, naming the rule."""
    weak(server.client().register(random_email(), password), "common")


@pytest.mark.parametrize("form", ["equal", "equal-upper-case", "local-part", "local-part-upper"])
def test_password_naming_the_email_is_refused(server: Server, form: str) -> None:
    """Point 7: a password equal to the email or containing its local part is refused."""
    email = random_email()
    local = email.partition("@")[0]
    password = {
        "equal": email,
        "equal-upper-case": email.upper(),
        "local-part": f"xy-{local}-77",
        "local-part-upper": f"XY{local.upper()}",
    }[form]
    weak(server.client().register(email, password), "email")


def test_local_part_rule_starts_at_four_characters(server: Server) -> None:
    """Point 7: a 3-character local part is no rule; from 4 characters it is."""
    domain = f"d{random_hex(4)}.example"
    short = server.client().register(f"bob@{domain}", "bob-likes-long-walks")
    assert short.status == 201, short
    weak(server.client().register(f"bobb@{domain}", "bobb-likes-long-walks"), "email")


@pytest.mark.parametrize("password", ["mycloudchatpass1", "My-CLOUDCHAT-pass"])
def test_password_containing_the_site_name_is_refused(server: Server, password: str) -> None:
    """Point 7: a password containing SITE_NAME (default CloudChat), any case, is refused."""
    weak(server.client().register(random_email(), password), "site name")


def test_require_mix_adds_the_two_kinds_rule(make_server: ServerFactory) -> None:
    """Point 7: PASSWORD_REQUIRE_MIX=1 refuses letters only; the other rules still apply."""
    srv = make_server.start(
        "embedded", {**HIGH_LIMITS, "PASSWORD_REQUIRE_MIX": "1", "SITE_NAME": "Acme Chat"}
    )
    weak(srv.client().register(random_email(), "onlyletterslong"), "two")
    weak(srv.client().register(random_email(), "i-love-ACME CHAT-99"), "site name")
    weak(srv.client().register(random_email(), "Password123"), "common")
    email = random_email()
    weak(srv.client().register(email, email), "email")
    assert srv.client().register(random_email(), "long-enough-42").status == 201


def test_blocklist_file_refuses_its_entries(make_server: ServerFactory, tmp_path: Path) -> None:
    """Point 7: PASSWORD_BLOCKLIST_FILE's entries are refused case-insensitively."""
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("Zebra-Tango-42\n  our office wifi key  \n", encoding="utf-8")
    srv = make_server.start("embedded", {**HIGH_LIMITS, "PASSWORD_BLOCKLIST_FILE": str(blocklist)})
    for password in ("zebra-tango-42", "ZEBRA-TANGO-42", "Our Office WiFi Key"):
        weak(srv.client().register(random_email(), password), "common")
    assert srv.client().register(random_email(), "zebra-tango-43").status == 201


def test_password_change_applies_the_rules(server: Server) -> None:
    """Point 7: /auth/password/change refuses what register refuses, naming the rule."""
    email, password = new_account(server)
    client = logged_in(server, email, password)
    local = email.partition("@")[0]
    for new, rule in [
        ("qwertyuiop", "common"),
        ("Password123", "common"),
        (email.upper(), "email"),
        (f"new-{local}-pass", "email"),
        ("cloudchat-forever", "site name"),
    ]:
        answer = client.post(
            "/auth/password/change", {"current_password": password, "new_password": new}
        )
        weak(answer, rule)
    good = client.post(
        "/auth/password/change",
        {"current_password": password, "new_password": "correcthorsebatterystaple"},
    )
    assert good.status == 200, good


def test_password_reset_applies_the_rules_and_keeps_the_token(server: Server) -> None:
    """Point 7: reset refuses weak passwords (its fixed message); the token stays usable."""
    email, _ = new_account(server)
    token = reset_token(server, email)
    local = email.partition("@")[0]
    for password in ("qwertyuiop", "PASSWORD", f"{local}-2024!", "my-cloudchat-key"):
        body = assert_error(reset(server, token, password), 400, "weak_password")
        assert body["error"] == "Invalid token or weak password", body
    assert reset(server, token, "correcthorsebatterystaple").status == 200
    assert server.client().login(email, "correcthorsebatterystaple").status == 200


@pytest.mark.parametrize("where", ["missing", "directory"])
def test_unreadable_blocklist_file_stops_the_server(tmp_path: Path, where: str) -> None:
    """Point 7: an unreadable PASSWORD_BLOCKLIST_FILE (missing, or a directory) makes the
    server exit 2, naming it, without a traceback."""
    blocklist = tmp_path / "missing" / "blocklist.txt" if where == "missing" else tmp_path
    env = {
        **base_env(),
        "CLOUDCHAT_DB_PATH": str(tmp_path / "cloudchat.db"),
        "PASSWORD_BLOCKLIST_FILE": str(blocklist),
    }
    try:
        done = run_cli([], env, tmp_path, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("the server started with an unreadable PASSWORD_BLOCKLIST_FILE")
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if "PASSWORD_BLOCKLIST_FILE" in line]
    assert lines, done.stderr
    assert "Traceback" not in done.stderr


# -- point 8: one address, one recipient -----------------------------------------------------

# The unit tests' list (tests/test_rules_unit.py), sent to the real server.


@pytest.mark.parametrize("address", list(INVALID_EMAILS.values()), ids=list(INVALID_EMAILS))
def test_invalid_email_is_400(server: Server, address: str) -> None:
    """Point 8: addresses outside API.md's grammar are refused with invalid_email."""
    answer = server.client().register(address, strong_password())
    assert_error(answer, 400, "invalid_email")


@pytest.mark.parametrize("form", ["apostrophe-plus", "idna-domain", "mixed-case-blanks"])
def test_valid_addresses_are_stored_and_mailed_alone(
    server: Server, mail: MailSink, form: str
) -> None:
    """Point 8: accepted forms are stored trimmed, lower-case, and mailed to that one address."""
    tag = random_hex(4)
    sent, stored = {
        "apostrophe-plus": (f"o'brien+tag{tag}@example.com", f"o'brien+tag{tag}@example.com"),
        "idna-domain": (f"x{tag}@xn--bcher-kva.example", f"x{tag}@xn--bcher-kva.example"),
        "mixed-case-blanks": (f" Mixed{tag}@Example.COM ", f"mixed{tag}@example.com"),
    }[form]
    password = strong_password()
    answer = server.client().register(sent, password)
    assert answer.status == 201, answer
    client = logged_in(server, stored, password)
    assert client.me().json()["user"]["email"] == stored
    (welcome,) = mail.wait_for(stored)
    assert welcome.rcpt_tos == [stored]
    assert welcome.message["To"] == stored


def test_comma_address_mails_nobody(server: Server, mail: MailSink) -> None:
    """Point 8: `Urgent-call-555-0100,victim@...` is refused and no one is mailed for it."""
    victim = f"victim-{random_hex(4)}@example.com"
    answer = server.client().register(f"Urgent-call-555-0100,{victim}", strong_password())
    assert_error(answer, 400, "invalid_email")
    marker, _ = new_account(server)
    mail.wait_for(marker)
    assert mail.to(victim) == [] and mail.to("urgent-call-555-0100") == []
    with mail.lock:
        assert all(len(received.rcpt_tos) == 1 for received in mail.messages), mail.messages
