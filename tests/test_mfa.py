"""Issue 16: two-factor sign-in (TOTP, RFC 6238) - the pure functions against the RFCs'
published vectors, then setup, confirm, the login step, recovery codes, the step-up checks
of the sensitive endpoints, disable, `mfa-reset`, export and audit, in both setups.

The codes are computed here by the test's own RFC 6238 implementation (`totp` below), never
by cloudchat's, so that a bug in the server's TOTP cannot hide behind itself. The server runs
on this machine, so its clock is ours: a test that depends on which step the server is in
picks its codes relative to the present step, and near a step's end polls until the next
one begins (`settled_step`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import secrets
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import cloudchat
from tests.conftest import SETUPS, shared_server
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
    run_cli,
    sql_rows,
    strong_password,
    wait_until,
)
from tests.mailsink import MailSink, Received

SITE_NAME = "Acme Chat"
STEP = 30
MARGIN = 5.0  # seconds a step must have left before a test relies on staying in it
RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
RECOVERY_RE = re.compile(r"[a-hjkmnp-z2-9]{4}(-[a-hjkmnp-z2-9]{4}){3}")
BASE32_RE = re.compile(r"[A-Z2-7]{32}")
MFA_REQUIRED = {
    "ok": False,
    "error": "Enter the code from your authenticator app",
    "code": "mfa_required",
}
ENABLED_SUBJECT = f"Two-factor sign-in is on for your {SITE_NAME} account"
DISABLED_SUBJECT = f"Two-factor sign-in is off for your {SITE_NAME} account"
RESET_LINK_RE = re.compile(r"/reset_password\?token=([A-Za-z0-9_\-]+)")
RFC_SECRET = b"12345678901234567890"
RFC4226_HOTP = [
    "755224",
    "287082",
    "359152",
    "969429",
    "338314",
    "254676",
    "287922",
    "162583",
    "399871",
    "520489",
]
RFC6238_SHA1 = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


# -- the test's own RFC 4226 / RFC 6238 ----------------------------------------------------


def my_hotp(key: bytes, counter: int, digits: int = 6) -> str:
    """RFC 4226 section 5.3, written out independently of cloudchat."""
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[19] & 0x0F
    (value,) = struct.unpack(">I", mac[offset : offset + 4])
    return f"{(value & 0x7FFFFFFF) % 10**digits:0{digits}d}"


def b32_key(secret: str) -> bytes:
    """The key of a base32 secret as an authenticator app reads it (padding optional)."""
    text = secret.upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def totp(secret: str, step: int) -> str:
    """RFC 6238 with the defaults (SHA-1, 6 digits): the code of a base32 secret in a step."""
    return my_hotp(b32_key(secret), step)


def current_step() -> int:
    """The TOTP step of this moment (T0 = 0, X = 30)."""
    return int(time.time() // STEP)


def settled_step(margin: float = MARGIN) -> int:
    """The present step, with at least `margin` seconds of it left: near a step's end,
    poll until the next step begins (a step that ends mid-test makes tests flaky)."""
    if STEP - time.time() % STEP < margin:
        step = current_step()
        wait_until(lambda: current_step() > step, margin + 2, what="the next TOTP step")
    return current_step()


def wrong_code(secret: str) -> str:
    """Six digits that are no code of the secret anywhere near now."""
    now = current_step()
    near = {totp(secret, step) for step in range(now - 4, now + 5)}
    while True:
        code = f"{secrets.randbelow(10**6):06d}"
        if code not in near:
            return code


def made_up_recovery_code() -> str:
    """A well-formed recovery code that the server never issued."""
    raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(16))
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))


@dataclass
class Authenticator:
    """The user's phone app, plus what the server knows: the last step it accepted a code
    of (every code of that step or an earlier one is refused from then on)."""

    secret: str
    last_step: int | None = None

    def fresh_code(self) -> str:
        """A code the server accepts now and has not seen: the earliest step after the last
        one used, among those the server's window (now-1..now+1) holds for a while yet;
        if all three are used, poll until the next step begins."""
        while True:
            now = time.time()
            step = int(now // STEP)
            window = [step - 1, step, step + 1] if STEP - now % STEP >= MARGIN else [step, step + 1]
            for candidate in window:
                if self.last_step is None or candidate > self.last_step:
                    self.last_step = candidate
                    return totp(self.secret, candidate)
            used = self.last_step
            wait_until(
                lambda used=used: current_step() >= used, STEP + 2, what="an unused TOTP step"
            )


# -- servers ---------------------------------------------------------------------------------

_addresses = itertools.count(1)


def site_env(sink: MailSink, **extra: str) -> dict[str, str | None]:
    """Limits out of the way, mail to the sink, a site name with a blank in it."""
    return {**ALL_LIMITS_RAISED, **sink.env(), "MAIL_RETRIES": "0", "SITE_NAME": SITE_NAME, **extra}


@pytest.fixture(scope="module", params=SETUPS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sink: MailSink
) -> Iterator[Server]:
    """One server per setup, every limit raised, mailing the module's sink."""
    yield from shared_server(request, tmp_path_factory, site_env(sink))


@pytest.fixture(scope="module", params=SETUPS)
def limited(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sink: MailSink
) -> Iterator[Server]:
    """One server per setup with low login limits: RATE_LOGIN_IDENTIFIER and RATE_LOGIN_IP
    3/600. Every client there has addresses of its own (X-Forwarded-For from loopback, a
    trusted proxy by default) and every test its own accounts, so counters never meet."""
    overrides = site_env(sink, RATE_LOGIN_IDENTIFIER="3/600", RATE_LOGIN_IP="3/600")
    yield from shared_server(request, tmp_path_factory, overrides)


# -- helpers ---------------------------------------------------------------------------------


def new_ip() -> str:
    """An address from 198.18.0.0/15 (benchmarking) not used before in this module."""
    n = next(_addresses)
    return f"198.18.{n // 250}.{n % 250 + 1}"


def browser(server: Server, agent: str = "tests") -> Client:
    """A new browser with no cookies, at an address of its own."""
    return server.client({"X-Forwarded-For": new_ip(), "User-Agent": agent})


def move(client: Client) -> None:
    """Give a browser a new address (its next requests count on a new address key)."""
    client.headers["X-Forwarded-For"] = new_ip()


def new_account(server: Server, email: str | None = None) -> tuple[str, str]:
    """Register a fresh account; (email, password)."""
    email, password = email or random_email(), strong_password()
    answer = browser(server).register(email, password)
    assert answer.status == 201, answer
    return email, password


def signed_in(server: Server, email: str, password: str, agent: str = "tests") -> Client:
    """A new browser signed in with the password alone (an account without MFA)."""
    client = browser(server, agent)
    answer = client.login(email, password)
    assert answer.status == 200, answer
    assert client.cookies.get("cc_auth"), answer.headers
    return client


def user_id_of(server: Server, email: str) -> int:
    """The account's id, from SQL."""
    (row,) = sql_rows(server, "SELECT id FROM users WHERE email = %s", (email,))
    return int(row["id"])


def me(client: Client) -> dict[str, Any]:
    """The signed-in user from GET /auth/me."""
    answer = client.me()
    assert answer.status == 200, answer
    return answer.json()["user"]


def setup(client: Client, password: Any) -> Response:
    """POST /auth/mfa/totp/setup."""
    return client.post("/auth/mfa/totp/setup", {"password": password})


def confirm(client: Client, code: Any) -> Response:
    """POST /auth/mfa/totp/confirm."""
    return client.post("/auth/mfa/totp/confirm", {"code": code})


def login_mfa(client: Client, body: dict[str, Any]) -> Response:
    """POST /auth/login/mfa with the browser's cc_mfa cookie (if any)."""
    return client.post("/auth/login/mfa", body)


def events(server: Server, user_id: int, event: str) -> list[str]:
    """The details of a user's audit events of one kind, oldest first."""
    rows = sql_rows(
        server,
        "SELECT detail FROM auth_events WHERE user_id = %s AND event = %s ORDER BY id",
        (user_id, event),
    )
    return [str(row["detail"] or "") for row in rows]


def mails_with(mail: MailSink, address: str, subject: str) -> list[Received]:
    """Wait until a mail with this subject reached the address; all such mails."""
    return wait_until(
        lambda: [m for m in mail.to(address) if m.message["Subject"] == subject],
        10,
        what=f"a mail {subject!r} to {address}",
    )


def expired(response: Response, name: str) -> bool:
    """True when the answer expires the named cookie (Max-Age=0)."""
    cookie = response.cookie(name)
    return cookie is not None and cookie[1].get("max-age") == "0"


@dataclass
class MfaAccount:
    """An account with two-factor sign-in on, and the browser that switched it on (signed
    in before, so it holds a session and the account's device cookie)."""

    email: str
    password: str
    user_id: int
    owner: Client
    app: Authenticator
    recovery_codes: list[str]


def enable_mfa(client: Client, password: str) -> tuple[Authenticator, list[str]]:
    """Setup and confirm on a signed-in browser; (the app, the recovery codes)."""
    started = setup(client, password)
    assert started.status == 200, started
    app = Authenticator(started.json()["secret"])
    confirmed = confirm(client, app.fresh_code())
    assert confirmed.status == 200, confirmed
    return app, confirmed.json()["recovery_codes"]


def mfa_account(server: Server, email: str | None = None) -> MfaAccount:
    """A fresh account with two-factor sign-in switched on."""
    email, password = new_account(server, email)
    owner = signed_in(server, email, password, "owner")
    app, codes = enable_mfa(owner, password)
    return MfaAccount(email, password, user_id_of(server, email), owner, app, codes)


def password_step(server: Server, account: MfaAccount, client: Client | None = None) -> Client:
    """The right password of an MFA account: 401 mfa_required and a cc_mfa cookie; the
    browser, now holding it."""
    client = client or browser(server, "second-browser")
    answer = client.login(account.email, account.password)
    assert answer.status == 401 and answer.json() == MFA_REQUIRED, answer
    assert client.cookies.get("cc_mfa"), answer.headers
    return client


def mfa_signed_in(server: Server, account: MfaAccount) -> Client:
    """A new browser signed in to an MFA account: password, then a fresh code."""
    client = password_step(server, account)
    answer = login_mfa(client, {"code": account.app.fresh_code()})
    assert answer.status == 200 and answer.json() == {"ok": True}, answer
    return client


# -- unit: the pure functions against the RFCs ----------------------------------------------


@pytest.mark.parametrize(("counter", "expected"), list(enumerate(RFC4226_HOTP)))
def test_hotp_matches_rfc4226_appendix_d(counter: int, expected: str) -> None:
    """RFC 4226 Appendix D: the server's hotp and the test's own give the published values."""
    assert my_hotp(RFC_SECRET, counter) == expected
    assert cloudchat.hotp(RFC_SECRET, counter) == expected
    assert cloudchat.hotp(RFC_SECRET, counter, 6) == expected


@pytest.mark.parametrize(("unix_time", "expected"), RFC6238_SHA1)
def test_totp_matches_rfc6238_appendix_b(unix_time: int, expected: str) -> None:
    """RFC 6238 Appendix B, SHA-1, 8 digits, through totp_step."""
    step = cloudchat.totp_step(unix_time)
    assert step == unix_time // 30
    assert cloudchat.hotp(RFC_SECRET, step, 8) == expected
    assert my_hotp(RFC_SECRET, step, 8) == expected


def test_totp_step_boundaries() -> None:
    """A step is [k*30, k*30+30): its first second and the previous one's last fractions."""
    k = 56_789_012
    assert cloudchat.totp_step(k * 30) == k
    assert cloudchat.totp_step(k * 30 + 29.999) == k
    assert cloudchat.totp_step(k * 30 - 0.001) == k - 1
    assert cloudchat.totp_step(k * 30 - 1) == k - 1
    assert cloudchat.totp_step(0) == 0


RFC_SECRET_B32 = base64.b32encode(RFC_SECRET).decode()
BOUNDARY_K = 57_123_456


@pytest.mark.parametrize(
    "unix_time", [BOUNDARY_K * 30, BOUNDARY_K * 30 - 1], ids=["k*30", "k*30-1"]
)
def test_matching_totp_step_window(unix_time: int) -> None:
    """now-1, now and now+1 are accepted (the step is returned), now-2 and now+2 are not;
    exactly on a step boundary and one second before it."""
    now = unix_time // 30
    secret = RFC_SECRET_B32
    codes = {step: totp(secret, step) for step in range(now - 3, now + 4)}
    assert len(set(codes.values())) == len(codes), codes  # no collision muddles the test
    for step in (now - 1, now, now + 1):
        assert cloudchat.matching_totp_step(secret, codes[step], unix_time, None) == step
    for step in (now - 3, now - 2, now + 2, now + 3):
        assert cloudchat.matching_totp_step(secret, codes[step], unix_time, None) is None
    # A lower-case, unpadded secret is the same key.
    assert cloudchat.matching_totp_step(secret.lower(), codes[now], unix_time, None) == now


@pytest.mark.parametrize(
    "unix_time", [BOUNDARY_K * 30, BOUNDARY_K * 30 - 1], ids=["k*30", "k*30-1"]
)
def test_matching_totp_step_after(unix_time: int) -> None:
    """`after` (the last step accepted) refuses that step and earlier ones, never later."""
    now = unix_time // 30
    secret = RFC_SECRET_B32
    match = cloudchat.matching_totp_step
    assert match(secret, totp(secret, now), unix_time, now) is None
    assert match(secret, totp(secret, now), unix_time, now + 1) is None
    assert match(secret, totp(secret, now), unix_time, now - 1) == now
    assert match(secret, totp(secret, now - 1), unix_time, now - 1) is None
    assert match(secret, totp(secret, now - 1), unix_time, now - 2) == now - 1
    assert match(secret, totp(secret, now + 1), unix_time, now) == now + 1
    assert match(secret, totp(secret, now + 1), unix_time, now + 1) is None
    assert match(secret, totp(secret, now - 1), unix_time, now) is None


def test_matching_totp_step_input_forms() -> None:
    """Blanks inside or around the code are ignored; 5 or 7 digits, letters, signs and
    non-ASCII digits (Arabic-Indic, full-width, superscript) are no code."""
    unix_time = BOUNDARY_K * 30 + 7
    now = unix_time // 30
    secret = RFC_SECRET_B32
    code = totp(secret, now)
    match = cloudchat.matching_totp_step
    for spaced in (f"{code[:3]} {code[3:]}", f" {code} ", f"{code[:2]} {code[2:4]} {code[4:]}"):
        assert match(secret, spaced, unix_time, None) == now, spaced
    assert match(secret, f"{code[:3]}\t{code[3:]}", unix_time, None) == now
    arabic = code.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    fullwidth = code.translate(
        str.maketrans("0123456789", "".join(map(chr, range(0xFF10, 0xFF1A))))
    )
    superscript = code.translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))
    refused = [
        code[:5],
        code + "0",
        "0" + code,
        code[:5] + "a",
        "a" + code[1:],
        "abcdef",
        "+" + code[1:],
        "-" + code[1:],
        code[:3] + "-" + code[3:],
        arabic,
        fullwidth,
        superscript,
        "",
        "      ",
    ]
    for text in refused:
        assert match(secret, text, unix_time, None) is None, repr(text)


def test_otpauth_uri_parses() -> None:
    """The Key URI: otpauth://totp/SITE:email?secret&issuer&algorithm&digits&period, with
    a site name holding a blank and an address holding a +, both percent-encoded."""
    secret = cloudchat.new_totp_secret()
    email = "first.last+chat@example.com"
    uri = cloudchat.otpauth_uri(SITE_NAME, email, secret)
    parts = urllib.parse.urlsplit(uri)
    assert parts.scheme == "otpauth" and parts.netloc == "totp", uri
    assert urllib.parse.unquote(parts.path) == f"/{SITE_NAME}:{email}", uri
    assert parts.path == "/Acme%20Chat:first.last%2Bchat@example.com", uri
    query = urllib.parse.parse_qs(parts.query, strict_parsing=True)
    assert query == {
        "secret": [secret],
        "issuer": [SITE_NAME],
        "algorithm": ["SHA1"],
        "digits": ["6"],
        "period": ["30"],
    }, uri
    assert "issuer=Acme%20Chat" in parts.query, uri  # %20: some apps show a + as is
    plain = urllib.parse.urlsplit(cloudchat.otpauth_uri("CloudChat", "a@b.example", secret))
    assert urllib.parse.unquote(plain.path) == "/CloudChat:a@b.example"


def test_recovery_codes_and_their_hash() -> None:
    """new_recovery_code: xxxx-xxxx-xxxx-xxxx of the unambiguous alphabet; recovery_code_hash
    ignores case, blanks and dashes, and refuses wrong lengths and characters."""
    codes = {cloudchat.new_recovery_code() for _ in range(50)}
    assert len(codes) == 50
    for code in codes:
        assert RECOVERY_RE.fullmatch(code), code
    code = sorted(codes)[0]
    digest = cloudchat.recovery_code_hash(code)
    assert digest is not None and re.fullmatch(r"[0-9a-f]{64}", digest), digest
    raw = code.replace("-", "")
    for form in (
        code.upper(),
        raw,
        raw.upper(),
        " ".join(code.split("-")),
        f"  {code}  ",
        code[:7] + code[7:].upper(),
        "\t".join(code.split("-")),
    ):
        assert cloudchat.recovery_code_hash(form) == digest, form
    other = sorted(codes)[1]
    assert cloudchat.recovery_code_hash(other) != digest
    refused = [
        raw[:15],
        raw + "a",
        code[:-1],
        code + "-a",
        "",
        "0" + raw[1:],
        "o" + raw[1:],
        "1" + raw[1:],
        "l" + raw[1:],
        "i" + raw[1:],
        "é" + raw[1:],
        "_" + raw[1:],
        raw[:8] + "." + raw[8:15],
    ]
    for text in refused:
        assert cloudchat.recovery_code_hash(text) is None, repr(text)


def test_new_totp_secret() -> None:
    """32 base32 characters (no padding) of 20 random bytes, new each call; totp_key reads
    it back in any case."""
    secrets_seen = {cloudchat.new_totp_secret() for _ in range(20)}
    assert len(secrets_seen) == 20
    for secret in secrets_seen:
        assert BASE32_RE.fullmatch(secret), secret
        key = base64.b32decode(secret)
        assert len(key) == 20
        assert cloudchat.totp_key(secret) == key
        assert cloudchat.totp_key(secret.lower()) == key


# -- setup and confirm ---------------------------------------------------------------------


def test_setup_and_confirm_switch_mfa_on(server: Server, mail: MailSink) -> None:
    """The whole switch-on: setup needs a session and the password; the answer's secret and
    Key URI; confirm with the app's code gives 10 distinct recovery codes; /auth/me says
    mfa_enabled, also on a second session cached before; the mail; the audit rows."""
    email, password = new_account(server, f"u-{random_hex()}+2fa@example.com")
    client = signed_in(server, email, password, "laptop")
    second = signed_in(server, email, password, "phone")
    assert me(second)["mfa_enabled"] is False  # cached now, with Redis
    user_id = user_id_of(server, email)

    anonymous = browser(server)
    assert setup(anonymous, password).json() == UNAUTHORIZED
    assert confirm(anonymous, "123456").json() == UNAUTHORIZED
    assert_error(client.post("/auth/mfa/totp/setup", {}), 400, "invalid_input")
    wrong = setup(client, strong_password())
    assert wrong.status == 401 and wrong.json() == INVALID_CREDENTIALS, wrong
    assert_error(confirm(client, "123456"), 409, "no_mfa_setup")
    assert events(server, user_id, "password_check_failed") == ["action=mfa_setup"]

    started = setup(client, password)
    assert started.status == 200, started
    body = started.json()
    assert set(body) == {"ok", "secret", "otpauth_uri"} and body["ok"] is True, body
    secret = body["secret"]
    assert BASE32_RE.fullmatch(secret) and len(b32_key(secret)) == 20, secret
    parts = urllib.parse.urlsplit(body["otpauth_uri"])
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp"), body
    assert urllib.parse.unquote(parts.path) == f"/{SITE_NAME}:{email}", body
    query = urllib.parse.parse_qs(parts.query)
    assert query["secret"] == [secret] and query["issuer"] == [SITE_NAME], body
    assert query["digits"] == ["6"] and query["period"] == ["30"], body
    assert me(client)["mfa_enabled"] is False  # pending is not on
    assert client.login(email, password).status == 200  # nor does login ask for a code

    assert_error(client.post("/auth/mfa/totp/confirm", {}), 400, "invalid_input")
    assert_error(confirm(client, wrong_code(secret)), 400, "invalid_code")
    assert events(server, user_id, "mfa_code_failed") == ["action=mfa_confirm"]
    app = Authenticator(secret)
    confirmed = confirm(client, app.fresh_code())
    assert confirmed.status == 200, confirmed
    confirm_step = app.last_step
    codes = confirmed.json()["recovery_codes"]
    assert confirmed.json() == {"ok": True, "recovery_codes": codes}
    assert len(codes) == 10 and len(set(codes)) == 10, codes
    for code in codes:
        assert RECOVERY_RE.fullmatch(code), code

    assert me(client)["mfa_enabled"] is True
    assert me(second)["mfa_enabled"] is True  # the cached session shows it at once
    assert_error(confirm(client, app.fresh_code()), 409, "no_mfa_setup")
    (notice,) = mails_with(mail, email, ENABLED_SUBJECT)
    assert notice.rcpt_tos == [email] and "switched on" in notice.text()
    assert events(server, user_id, "mfa_setup_started") == [""]
    assert events(server, user_id, "mfa_enabled") == [""]
    stored = sql_rows(
        server,
        "SELECT secret, confirmed_at, last_step FROM credentials"
        " WHERE user_id = %s AND type = 'totp'",
        (user_id,),
    )
    assert len(stored) == 1 and stored[0]["secret"] == secret, stored
    assert stored[0]["confirmed_at"] is not None and stored[0]["last_step"] == confirm_step
    hashes = sql_rows(
        server, "SELECT code_hash FROM mfa_recovery_codes WHERE user_id = %s", (user_id,)
    )
    assert len(hashes) == 10, hashes


def test_setup_again_replaces_a_pending_secret(server: Server) -> None:
    """A second setup while pending: a new secret, the old one's code no longer confirms,
    the new one's does; a setup once confirmed is 409 mfa_enabled."""
    email, password = new_account(server)
    client = signed_in(server, email, password)
    first = setup(client, password).json()["secret"]
    again = setup(client, password)
    assert again.status == 200, again
    second = again.json()["secret"]
    assert second != first
    old_app, new_app = Authenticator(first), Authenticator(second)
    assert_error(confirm(client, old_app.fresh_code()), 400, "invalid_code")
    assert me(client)["mfa_enabled"] is False
    assert confirm(client, new_app.fresh_code()).status == 200
    assert me(client)["mfa_enabled"] is True
    assert_error(setup(client, password), 409, "mfa_enabled")
    stored = sql_rows(
        server,
        "SELECT secret FROM credentials WHERE user_id = %s AND type = 'totp'",
        (user_id_of(server, email),),
    )
    assert stored == [{"secret": second}], stored


# -- the login step --------------------------------------------------------------------------


def test_login_of_an_mfa_account_needs_the_code(server: Server) -> None:
    """Right password: 401 mfa_required, cc_mfa (HttpOnly, 5 minutes, Lax), no session;
    wrong password: the usual 401, no cc_mfa; a current code: the session; that code again
    (a new login) and the confirm's code: invalid_code."""
    account = mfa_account(server)
    confirm_code = totp(account.app.secret, account.app.last_step or 0)
    client = browser(server)
    answer = client.login(account.email, account.password)
    assert answer.status == 401 and answer.json() == MFA_REQUIRED, answer
    cookie = answer.cookie("cc_mfa")
    assert cookie is not None, answer.headers
    token, attrs = cookie
    assert len(token) >= 32, token
    assert "httponly" in attrs and attrs.get("max-age") == "300", attrs
    assert attrs.get("samesite", "").lower() == "lax" and attrs.get("path") == "/", attrs
    assert answer.cookie("cc_auth") is None and "cc_auth" not in client.cookies
    assert client.me().json() == UNAUTHORIZED

    other = browser(server)
    wrong = other.login(account.email, strong_password())
    assert wrong.status == 401 and wrong.json() == INVALID_CREDENTIALS, wrong
    assert wrong.cookie("cc_mfa") is None and wrong.cookie("cc_auth") is None
    unknown = other.login(random_email(), account.password)
    assert unknown.json() == INVALID_CREDENTIALS and unknown.cookie("cc_mfa") is None

    code = account.app.fresh_code()
    done = login_mfa(client, {"code": code})
    assert done.status == 200 and done.json() == {"ok": True}, done
    assert done.cookie("cc_auth") is not None and client.cookies.get("cc_auth")
    assert expired(done, "cc_mfa") and "cc_mfa" not in client.cookies, done.headers
    assert done.cookie("cc_device") is not None, done.headers
    assert me(client)["email"] == account.email
    assert events(server, account.user_id, "login_mfa_pending") == [""]
    (ok,) = events(server, account.user_id, "login_ok")[-1:]
    assert "second_factor=totp" in ok, ok

    replay = password_step(server, account)
    assert_error(login_mfa(replay, {"code": code}), 401, "invalid_code")
    assert_error(login_mfa(replay, {"code": confirm_code}), 401, "invalid_code")
    assert "cc_auth" not in replay.cookies
    assert replay.me().json() == UNAUTHORIZED
    failed = events(server, account.user_id, "mfa_code_failed")
    assert failed == ["action=login", "action=login"], failed


def test_the_window_and_the_previous_step(server: Server) -> None:
    """With no code used for a while (the last accepted step rewound in SQL, as if the
    confirm was minutes ago): codes two steps away are refused, the previous step's code
    is accepted, and it and every earlier one are refused afterwards; a later one works."""
    account = mfa_account(server)
    now = settled_step()
    sql_rows(
        server,
        "UPDATE credentials SET last_step = %s WHERE user_id = %s AND type = 'totp'",
        (now - 5, account.user_id),
    )
    secret = account.app.secret
    client = password_step(server, account)
    assert_error(login_mfa(client, {"code": totp(secret, now - 2)}), 401, "invalid_code")
    assert_error(login_mfa(client, {"code": totp(secret, now + 2)}), 401, "invalid_code")
    previous = login_mfa(client, {"code": totp(secret, now - 1)})
    assert previous.status == 200, (previous, now, time.time())
    assert me(client)["email"] == account.email
    assert current_step() == now, "the step ended mid-test: the margin is too small"

    again = password_step(server, account)
    assert_error(login_mfa(again, {"code": totp(secret, now - 1)}), 401, "invalid_code")
    assert_error(login_mfa(again, {"code": totp(secret, now - 2)}), 401, "invalid_code")
    later = login_mfa(again, {"code": totp(secret, now)})
    assert later.status == 200, later
    (row,) = sql_rows(
        server,
        "SELECT last_step FROM credentials WHERE user_id = %s AND type = 'totp'",
        (account.user_id,),
    )
    assert row["last_step"] == now, row


def test_recovery_codes_log_in_once(server: Server) -> None:
    """A recovery code instead of the app's: a session, once; the same code again is
    invalid_code; audited with the count left; typed in upper case or without dashes works."""
    account = mfa_account(server)
    first, second, third = account.recovery_codes[:3]
    client = password_step(server, account)
    answer = login_mfa(client, {"recovery_code": first})
    assert answer.status == 200 and answer.json() == {"ok": True}, answer
    assert me(client)["email"] == account.email
    assert events(server, account.user_id, "mfa_recovery_code_used") == ["action=login left=9"]
    assert "second_factor=recovery_code" in events(server, account.user_id, "login_ok")[-1]

    again = password_step(server, account)
    assert_error(login_mfa(again, {"recovery_code": first}), 401, "invalid_code")
    assert_error(login_mfa(again, {"recovery_code": first.upper()}), 401, "invalid_code")
    assert_error(login_mfa(again, {"recovery_code": made_up_recovery_code()}), 401, "invalid_code")
    assert_error(login_mfa(again, {"recovery_code": "not a code"}), 401, "invalid_code")

    upper = login_mfa(again, {"recovery_code": second.upper()})
    assert upper.status == 200, upper
    bare = password_step(server, account)
    answer = login_mfa(bare, {"recovery_code": f" {third.replace('-', '')} "})
    assert answer.status == 200, answer
    used = events(server, account.user_id, "mfa_recovery_code_used")
    assert used == ["action=login left=9", "action=login left=8", "action=login left=7"], used
    (row,) = sql_rows(
        server,
        "SELECT count(*) AS n FROM mfa_recovery_codes WHERE user_id = %s",
        (account.user_id,),
    )
    assert row["n"] == 7, row


def test_cc_mfa_cookie_rules(server: Server) -> None:
    """No cc_mfa, a made-up one: mfa_expired; both code and recovery_code, or neither: 400
    (the cookie still good after); after a success, the same cookie: mfa_expired."""
    account = mfa_account(server)
    code = made_up_recovery_code()
    nobody = browser(server)
    assert_error(login_mfa(nobody, {"code": "123456"}), 401, "mfa_expired")
    assert_error(login_mfa(nobody, {"recovery_code": code}), 401, "mfa_expired")
    nobody.cookies["cc_mfa"] = secrets.token_urlsafe(32)
    assert_error(login_mfa(nobody, {"code": "123456"}), 401, "mfa_expired")
    nobody.cookies["cc_mfa"] = "x" * 500
    assert_error(login_mfa(nobody, {"code": "123456"}), 401, "mfa_expired")

    client = password_step(server, account)
    token = client.cookies["cc_mfa"]
    both = {"code": "123456", "recovery_code": account.recovery_codes[0]}
    for body in (both, {}, {"code": ""}, {"recovery_code": "  "}, {"other": "123456"}):
        assert_error(login_mfa(client, body), 400, "invalid_input")
    recovery = sql_rows(
        server,
        "SELECT count(*) AS n FROM mfa_recovery_codes WHERE user_id = %s",
        (account.user_id,),
    )
    assert recovery[0]["n"] == 10, recovery  # the 400 used nothing up
    answer = login_mfa(client, {"code": account.app.fresh_code()})
    assert answer.status == 200, answer

    reuse = browser(server)
    reuse.cookies["cc_mfa"] = token
    assert_error(login_mfa(reuse, {"code": account.app.fresh_code()}), 401, "mfa_expired")
    assert_error(login_mfa(reuse, {"recovery_code": account.recovery_codes[1]}), 401, "mfa_expired")
    assert "cc_auth" not in reuse.cookies


def test_five_wrong_codes_end_the_login(server: Server) -> None:
    """Five wrong codes on one cc_mfa: it is dead (a right code then is mfa_expired); the
    right code, unused, works with the password again."""
    account = mfa_account(server)
    client = password_step(server, account)
    for _ in range(5):
        assert_error(
            login_mfa(client, {"code": wrong_code(account.app.secret)}), 401, "invalid_code"
        )
    code = account.app.fresh_code()
    assert_error(login_mfa(client, {"code": code}), 401, "mfa_expired")
    assert_error(
        login_mfa(client, {"recovery_code": account.recovery_codes[0]}), 401, "mfa_expired"
    )
    assert client.me().json() == UNAUTHORIZED
    fresh = password_step(server, account)
    answer = login_mfa(fresh, {"code": code})
    assert answer.status == 200, answer


def test_one_code_from_eight_threads_logs_in_once(server: Server) -> None:
    """Eight requests at once with the same right code and the same cc_mfa: exactly one
    200 (one session), the others 401 invalid_code or mfa_expired."""
    account = mfa_account(server)
    client = password_step(server, account)
    code = account.app.fresh_code()
    barrier = threading.Barrier(8)
    results: list[Response] = []

    def attempt() -> None:
        racer = server.client(client.headers)
        racer.cookies = dict(client.cookies)
        barrier.wait(10)
        results.append(login_mfa(racer, {"code": code}))  # list.append is atomic

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 8, results
    statuses = sorted(r.status for r in results)
    assert statuses == [200] + [401] * 7, results
    for answer in results:
        if answer.status == 401:
            assert answer.json()["code"] in ("invalid_code", "mfa_expired"), answer
    sessions = [e for e in events(server, account.user_id, "login_ok") if "second_factor" in e]
    assert len(sessions) == 1, sessions


# -- the login limits -------------------------------------------------------------------------


def test_wrong_codes_count_on_the_account(limited: Server) -> None:
    """RATE_LOGIN_IDENTIFIER=3/600, every request from a new address: the owner's login,
    a password step and a right code fit; with a wrong code before it, the right code is
    the fourth attempt on the account and is invalid_code. The owner's own browser (its
    device cookie, its own counter) logs in with that very code afterwards."""
    fits = mfa_account(limited)  # its owner's login: attempt 1 on the account
    client = password_step(limited, fits)  # 2
    move(client)
    assert login_mfa(client, {"code": fits.app.fresh_code()}).status == 200  # 3

    account = mfa_account(limited)  # 1
    client = password_step(limited, account)  # 2
    move(client)
    assert_error(login_mfa(client, {"code": wrong_code(account.app.secret)}), 401, "invalid_code")
    move(client)
    code = account.app.fresh_code()
    assert_error(login_mfa(client, {"code": code}), 401, "invalid_code")  # 4: over
    assert "cc_auth" not in client.cookies
    assert events(limited, account.user_id, "login_limited"), "no login_limited event"
    outsider = browser(limited)
    assert outsider.login(account.email, account.password).json() == INVALID_CREDENTIALS

    owner = account.owner
    move(owner)
    password_step(limited, account, owner)
    answer = login_mfa(owner, {"code": code})
    assert answer.status == 200, answer


def test_wrong_codes_count_on_the_address(limited: Server) -> None:
    """RATE_LOGIN_IP=3/600: from one address, a password step and a wrong code for one
    account, a password step for another: its right code is the fourth attempt from the
    address and is invalid_code; from the owner's browser elsewhere the same code works."""
    first = mfa_account(limited)
    second = mfa_account(limited)
    address = {"X-Forwarded-For": new_ip()}
    one = password_step(limited, first, limited.client(address))  # 1
    assert_error(login_mfa(one, {"code": wrong_code(first.app.secret)}), 401, "invalid_code")  # 2
    two = password_step(limited, second, limited.client(address))  # 3
    code = second.app.fresh_code()
    assert_error(login_mfa(two, {"code": code}), 401, "invalid_code")  # 4: over
    assert "cc_auth" not in two.cookies
    assert limited.client(address).login(second.email, second.password).json() == (
        INVALID_CREDENTIALS
    )

    owner = second.owner
    move(owner)
    password_step(limited, second, owner)
    answer = login_mfa(owner, {"code": code})
    assert answer.status == 200, answer


# -- step-up on the sensitive endpoints --------------------------------------------------------


@dataclass
class StepUp:
    """One endpoint that asks for the second factor beside the password."""

    name: str
    action: str  # the audit detail's action=

    def send(
        self, server: Server, client: Client, password: str, factor: dict[str, str]
    ) -> tuple[Response, Any]:
        """Call the endpoint; (the answer, what the call asked for)."""
        if self.name == "password_change":
            new = strong_password()
            body = {"current_password": password, "new_password": new, **factor}
            return client.post("/auth/password/change", body), new
        if self.name == "email_change":
            new = random_email()
            body = {"password": password, "new_email": new, **factor}
            return client.post("/auth/email/change", body), new
        if self.name == "delete_account":
            body = {"password": password, **factor}
            return client.request("DELETE", "/auth/me", json_body=body), None
        body = {"password": password, **factor}
        return client.post("/auth/mfa/totp/disable", body), None


STEP_UPS = [
    StepUp("password_change", "password_change"),
    StepUp("email_change", "email_change"),
    StepUp("delete_account", "delete_account"),
    StepUp("mfa_disable", "mfa_disable"),
]


def assert_unchanged(server: Server, account: MfaAccount, kind: str, asked: Any) -> None:
    """Nothing of a refused step-up happened."""
    assert me(account.owner)["mfa_enabled"] is True
    if kind == "password_change":
        assert browser(server).login(account.email, asked).json() == INVALID_CREDENTIALS
        password_step(server, account)  # the old password is still the right one
    elif kind == "email_change":
        rows = sql_rows(
            server, "SELECT email FROM email_tokens WHERE user_id = %s", (account.user_id,)
        )
        assert rows == [], rows
        assert not sql_rows(server, "SELECT id FROM users WHERE email = %s", (asked,))
    elif kind == "delete_account":
        assert user_id_of(server, account.email) == account.user_id
    else:
        rows = sql_rows(
            server,
            "SELECT confirmed_at FROM credentials WHERE user_id = %s AND type = 'totp'",
            (account.user_id,),
        )
        assert len(rows) == 1 and rows[0]["confirmed_at"] is not None, rows


@pytest.mark.parametrize("factor", ["code", "recovery_code"])
@pytest.mark.parametrize("endpoint", STEP_UPS, ids=[s.name for s in STEP_UPS])
def test_step_up(server: Server, mail: MailSink, endpoint: StepUp, factor: str) -> None:
    """With MFA on: no code -> 401 mfa_required, a wrong one -> 401 invalid_code (audited),
    nothing changed either way; a wrong password with the right code -> invalid_credentials
    (the code not used up); then the right code (or a recovery code) -> 200 and it happens."""
    account = mfa_account(server)
    client = account.owner
    kind = endpoint.name

    answer, asked = endpoint.send(server, client, account.password, {})
    assert answer.status == 401 and answer.json() == MFA_REQUIRED, answer
    assert_unchanged(server, account, kind, asked)
    blank, asked = endpoint.send(server, client, account.password, {"code": " "})
    assert blank.status == 401 and blank.json() == MFA_REQUIRED, blank

    if factor == "code":
        wrong = wrong_code(account.app.secret)
        right = account.app.fresh_code()
    else:
        wrong = made_up_recovery_code()
        right = account.recovery_codes[4].upper()
    answer, asked = endpoint.send(server, client, account.password, {factor: wrong})
    assert_error(answer, 401, "invalid_code")
    assert_unchanged(server, account, kind, asked)
    assert events(server, account.user_id, "mfa_code_failed") == [f"action={endpoint.action}"]

    answer, asked = endpoint.send(server, client, strong_password(), {factor: right})
    assert answer.status == 401 and answer.json() == INVALID_CREDENTIALS, answer
    assert_unchanged(server, account, kind, asked)

    answer, asked = endpoint.send(server, client, account.password, {factor: right})
    assert answer.status == 200 and answer.json()["ok"] is True, answer
    if factor == "recovery_code" and kind != "delete_account":
        used = events(server, account.user_id, "mfa_recovery_code_used")
        assert used == [f"action={endpoint.action} left=9"], used
    if kind == "password_change":
        password_step(server, MfaAccount(**{**account.__dict__, "password": asked}))
        old = browser(server).login(account.email, account.password)
        assert old.json() == INVALID_CREDENTIALS, old
    elif kind == "email_change":
        wait_until(lambda: mail.to(asked), 10, what=f"the change link to {asked}")
        rows = sql_rows(
            server, "SELECT email FROM email_tokens WHERE user_id = %s", (account.user_id,)
        )
        assert rows == [{"email": asked}], rows
    elif kind == "delete_account":
        assert client.me().json() == UNAUTHORIZED
        assert not sql_rows(server, "SELECT id FROM users WHERE id = %s", (account.user_id,))
        for table in ("credentials", "mfa_recovery_codes"):
            left = sql_rows(server, f"SELECT * FROM {table} WHERE user_id = %s", (account.user_id,))
            assert left == [], (table, left)
    else:
        assert me(client)["mfa_enabled"] is False
        (notice,) = mails_with(mail, account.email, DISABLED_SUBJECT)
        assert "switched off" in notice.text()
        assert signed_in(server, account.email, account.password).me().status == 200
        assert events(server, account.user_id, "mfa_disabled") == [""]
        for table in ("credentials", "mfa_recovery_codes"):
            rows = sql_rows(
                server,
                f"SELECT * FROM {table} WHERE user_id = %s"
                + (" AND type = 'totp'" if table == "credentials" else ""),
                (account.user_id,),
            )
            assert rows == [], (table, rows)
        assert_error(endpoint.send(server, client, account.password, {})[0], 409, "mfa_not_enabled")


def test_without_mfa_no_code_is_asked(server: Server) -> None:
    """An account without two-factor sign-in: password change, email change and deletion
    need the password alone; disable is 409 mfa_not_enabled."""
    email, password = new_account(server)
    client = signed_in(server, email, password)
    assert_error(
        client.post("/auth/mfa/totp/disable", {"password": password}), 409, "mfa_not_enabled"
    )
    # A pending setup is not "on": nothing is asked yet either.
    assert setup(client, password).status == 200
    new = strong_password()
    answer = client.post(
        "/auth/password/change", {"current_password": password, "new_password": new}
    )
    assert answer.status == 200, answer
    answer = client.post("/auth/email/change", {"password": new, "new_email": random_email()})
    assert answer.status == 200, answer
    answer = client.request("DELETE", "/auth/me", json_body={"password": new})
    assert answer.status == 200, answer
    assert client.me().json() == UNAUTHORIZED


# -- reset by mail, mfa-reset, export and audit ------------------------------------------------


def test_password_reset_by_mail_keeps_mfa_on(server: Server, mail: MailSink) -> None:
    """The reset link sets a new password, but the next login still asks for the code;
    the new password and a code sign in."""
    account = mfa_account(server)
    answer = browser(server).post("/auth/password/forgot", {"identifier": account.email})
    assert answer.status == 200, answer
    received = wait_until(
        lambda: [m for m in mail.to(account.email) if RESET_LINK_RE.search(m.text())],
        10,
        what="the reset link",
    )
    token = RESET_LINK_RE.search(received[0].text())
    assert token is not None
    new = strong_password()
    reset = browser(server).post("/auth/password/reset", {"token": token.group(1), "password": new})
    assert reset.status == 200, reset
    assert browser(server).login(account.email, account.password).json() == INVALID_CREDENTIALS
    fresh = MfaAccount(**{**account.__dict__, "password": new})
    client = password_step(server, fresh)
    answer = login_mfa(client, {"code": account.app.fresh_code()})
    assert answer.status == 200, answer
    assert me(client)["mfa_enabled"] is True


def test_mfa_reset_command(server: Server) -> None:
    """`mfa-reset EMAIL` switches it off (exit 0): the password alone signs in, audited as
    mfa_reset by=admin; an unknown account, or one without MFA: exit 1."""
    account = mfa_account(server)
    assert me(account.owner)["mfa_enabled"] is True  # cached, with Redis
    done = run_cli(["mfa-reset", account.email.upper()], server.env, server.workdir)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "two-factor sign-in switched off" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert me(account.owner)["mfa_enabled"] is False
    assert signed_in(server, account.email, account.password).me().status == 200
    assert events(server, account.user_id, "mfa_reset") == ["by=admin"]
    left = sql_rows(
        server, "SELECT * FROM mfa_recovery_codes WHERE user_id = %s", (account.user_id,)
    )
    assert left == [], left

    again = run_cli(["mfa-reset", account.email], server.env, server.workdir)
    assert again.returncode == 1, (again.stdout, again.stderr)
    assert "Traceback" not in again.stderr, again.stderr
    unknown = run_cli(["mfa-reset", random_email()], server.env, server.workdir)
    assert unknown.returncode == 1, (unknown.stdout, unknown.stderr)
    assert "Traceback" not in unknown.stderr, unknown.stderr
    assert events(server, account.user_id, "mfa_reset") == ["by=admin"]


def test_export_and_audit_never_hold_the_secret_or_codes(server: Server) -> None:
    """After a switch-on, logins with a code and a recovery code, wrong codes and a
    step-up: the export has mfa_enabled and recovery_codes_left, and neither it nor any
    audit row of the account holds the secret, a code or a recovery code."""
    account = mfa_account(server)
    used_codes = [totp(account.app.secret, account.app.last_step or 0)]
    client = password_step(server, account)
    wrong = wrong_code(account.app.secret)
    assert_error(login_mfa(client, {"code": wrong}), 401, "invalid_code")
    code = account.app.fresh_code()
    used_codes.append(code)
    assert login_mfa(client, {"code": code}).status == 200
    other = password_step(server, account)
    bad_recovery = made_up_recovery_code()
    assert_error(login_mfa(other, {"recovery_code": bad_recovery}), 401, "invalid_code")
    assert login_mfa(other, {"recovery_code": account.recovery_codes[0]}).status == 200
    new = strong_password()
    step_up = client.post(
        "/auth/password/change",
        {"current_password": account.password, "new_password": new, "code": wrong},
    )
    assert_error(step_up, 401, "invalid_code")

    answer = client.get("/auth/me/export")
    assert answer.status == 200, answer
    profile = answer.json()["profile"]
    assert profile["mfa_enabled"] is True and profile["recovery_codes_left"] == 9, profile
    text = answer.body.decode("utf-8")
    secret = account.app.secret
    forbidden = [secret, secret.lower(), bad_recovery, *used_codes, wrong]
    for recovery in account.recovery_codes:
        forbidden += [recovery, recovery.replace("-", ""), recovery.upper()]
    for value in forbidden:
        assert value not in text, f"the export holds {value!r}"
    rows = sql_rows(server, "SELECT * FROM auth_events WHERE user_id = %s", (account.user_id,))
    names = {row["event"] for row in rows}
    expected = {"mfa_setup_started", "mfa_enabled", "mfa_code_failed", "mfa_recovery_code_used"}
    assert expected <= names, names
    dumped = json.dumps(rows, default=str)
    for value in forbidden:
        assert value not in dumped, f"an audit row holds {value!r}"
    logs = server.log_text()
    for value in [secret, bad_recovery, *account.recovery_codes]:
        assert value not in logs, f"the log holds {value!r}"
