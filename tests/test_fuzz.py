"""Property-based fuzz of every endpoint: hostile bodies and headers never get a 5xx.

Each test drives one endpoint of a real server with requests built by Hypothesis: JSON objects
with the endpoint's real field names and values of every type (lone surrogates escaped in
JSON, NUL, SQL metacharacters, huge strings, nested objects, NaN), raw bytes, broken JSON,
chunked bodies, and random headers (Content-Type, Cookie with garbage or valid-looking
cc_auth/cc_app, X-Forwarded-For, X-Request-ID, User-Agent, long values under the header
limit). Every answer must be a 4xx JSON envelope (`ok` false, `error`, `code`) with a code
the contract names, or the endpoint's success shape; never a 5xx. After each endpoint the
server's log must hold no error or forged line, and its database no record that breaks the
schema (see tests/hostile_storage.py).

Endpoints that touch storage run against both setups (SQLite + in-process store, PostgreSQL
+ Redis); the others against the embedded setup only, to keep the module near 20 s.

FUZZ_EXAMPLES (default 60) sets the examples per endpoint test; for a long run:
    FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import SETUPS, shared_server
from tests.helpers import (
    ALL_LIMITS_RAISED,
    SECURITY_HEADERS,
    Response,
    Server,
    random_email,
    strong_password,
    wait_until,
)
from tests.hostile_net import server_stats
from tests.hostile_storage import schema_violations, sql_tables

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
MAX_BODY = 65536
LOG_LINE_RE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) cloudchat: ")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

# Errors every endpoint that reads a JSON body may answer.
BODY_ERRORS = {400: {"invalid_json", "invalid_input"}, 413: {"body_too_large"}}
MEDIA_ERRORS = {415: {"unsupported_media_type"}}


# -- values -----------------------------------------------------------------------------------

SQL_META = [
    "' OR 1=1 --",
    "' OR '1'='1",
    '"; DROP TABLE users; --',
    "'; DELETE FROM credentials; --",
    "' UNION SELECT secret FROM credentials --",
    "'; SELECT pg_sleep(5); --",
    "%s",
    "%(email)s",
    "%%",
    "\\",
    "\\'",
    "'",
    '"',
    "`",
    "$1",
    "?",
    ":id",
    "/*",
    "*/",
    "\x00",
    "a\x00b",
    "\x1a",
]
HUGE_UNITS = ["a", "é", "🙂", "\x00", "' OR 1=1 --", "%s", "\\", "\ud800", "\u2028"]
ODD_CHARS = list("\x00'\"\\%;-_*/$?:\t\r\n\x7f\u0085\u00a0\u200b\u202e\ufeff")

any_char = st.one_of(
    st.characters(exclude_categories=()),  # every code point, controls included
    st.characters(categories=["Cs"]),  # lone surrogates: valid JSON (\udxxx), not Unicode
    st.sampled_from(ODD_CHARS),
)
short_text = st.text(any_char, max_size=12)
huge_text = st.builds(lambda unit, n: unit * n, st.sampled_from(HUGE_UNITS), st.integers(64, 8000))
nasty_text = st.one_of(
    st.text(any_char, max_size=40),
    st.sampled_from(SQL_META),
    st.tuples(short_text, st.sampled_from(SQL_META), short_text).map("".join),
    huge_text,
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63),
    st.floats(),  # NaN and Infinity included: Python's json writes and reads them
    nasty_text,
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(short_text, children, max_size=3)
    ),
    max_leaves=8,
)


@dataclass(frozen=True)
class Real:
    """Stands for a live value the test fills in when it sends: a real password, token..."""

    what: str


def _email(local: str, domain: str, pad: str, upper: bool) -> str:
    address = f"{local}@{domain}"
    return pad + (address.upper() if upper else address) + pad


serial = st.integers(0, 2**48).map(lambda n: f"{n:012x}")
# Local parts the address rule accepts, SQL metacharacters and odd characters included.
valid_local = st.one_of(
    serial.map(lambda n: f"u-{n}"),
    st.tuples(
        st.sampled_from(["o'brien+x", "%s", "x'--", "a\\b", '"q"', "'OR'1'='1", "é", "$1", "%"]),
        serial,
    ).map("-".join),
    st.tuples(
        st.text(st.characters(exclude_categories=("Cs", "Z", "Cc")), min_size=1, max_size=20),
        serial,
    ).map(lambda pair: f"{pair[0].replace('@', '')}-{pair[1]}"),
)
valid_emails = st.builds(
    _email,
    valid_local,
    st.sampled_from(["example.com", "EXAMPLE.COM", "ex.co", "sub.example.org", "xn--p1ai.example"]),
    st.sampled_from(["", " ", "\t"]),
    st.booleans(),
)
odd_emails = st.builds(
    _email,
    st.one_of(
        st.text(st.characters(exclude_characters="@"), min_size=1, max_size=66),
        st.sampled_from(["", "a" * 65, "' OR 1=1 --", '"; DROP TABLE users; --']),
    ),
    st.sampled_from(["example.com", "x", "a" * 200 + ".com", "ex..co", ".co", "ex.co."]),
    st.sampled_from(["", " ", "\u3000", "\x00"]),
    st.booleans(),
)
valid_phones = st.builds(
    lambda plus, digits, sep: plus + sep.join(digits[i : i + 3] for i in range(0, len(digits), 3)),
    st.sampled_from(["", "+"]),
    st.text("0123456789", min_size=5, max_size=20),
    st.sampled_from(["", " ", "-"]),
)
odd_phones = st.builds(
    lambda plus, digits, sep: plus + sep.join(digits[i : i + 3] for i in range(0, len(digits), 3)),
    st.sampled_from(["", "+", "++", "-", "٣"]),
    st.text("0123456789", min_size=0, max_size=25),
    st.sampled_from(["", " ", "-", "\t", ".", "\u00a0"]),
)
strong_passwords = st.one_of(
    serial.map(lambda n: f"Pw-{n}-9x"),
    st.sampled_from(SQL_META[:6]).map(lambda meta: meta + "9x"),
    st.tuples(st.text(any_char, min_size=6, max_size=100), serial).map("".join),
)
weak_passwords = st.one_of(
    st.sampled_from(["password123", "Pw-1", "a" * 8, "1" * 8, "ab1" * 43, "Pw-1" * 32, "", " "]),
    st.text(any_char, max_size=140),
)
tokens = st.one_of(
    st.binary(min_size=32, max_size=32).map(
        lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    ),
    st.sampled_from(["a" * 128, "a" * 129, " ", "0" * 64]),
)
printable = st.text(
    st.characters(exclude_categories=("C", "Z"), include_characters=" "), max_size=64
)
# Values that pass each field's rules (so the request gets as far as storage).
VALID: dict[str, st.SearchStrategy[Any]] = {
    "email": valid_emails,
    "password": st.one_of(st.just(Real("password")), strong_passwords),
    "phone": valid_phones,
    "display_name": printable,
    "identifier": st.one_of(st.just(Real("email")), st.one_of(valid_emails, valid_phones)),
    "token": st.one_of(st.just(Real("token")), tokens),
    "message": st.text(any_char, min_size=1, max_size=60).filter(lambda m: m.strip()),
    "current_password": st.one_of(st.just(Real("password")), strong_passwords),
    "new_password": strong_passwords,
    "new_email": st.one_of(st.just(Real("new_email")), valid_emails),
    "code": st.from_regex(r"[0-9]{6}", fullmatch=True),
    "recovery_code": st.from_regex(r"[a-km-np-z2-9]{4}(-[a-km-np-z2-9]{4}){3}", fullmatch=True),
}
# Values that look like the field but break its rules.
ODD: dict[str, st.SearchStrategy[Any]] = {
    "email": odd_emails,
    "password": weak_passwords,
    "phone": odd_phones,
    "display_name": st.one_of(
        st.text(any_char, max_size=70), st.sampled_from(["A" * 65, "\u202e", "\n", " "])
    ),
    "identifier": st.one_of(odd_emails, odd_phones),
    "token": tokens,
    "message": st.sampled_from(["é" * 4000, "a" * 4001, " \n\t", ""]),
    "current_password": weak_passwords,
    "new_password": weak_passwords,
    "new_email": odd_emails,
    "code": st.one_of(
        st.text(any_char, max_size=12), st.sampled_from(["١٢٣٤٥٦", "12345", "1234567"])
    ),
    "recovery_code": st.text(any_char, max_size=40),
}


# What a well-behaved client sends: the live account's values, filled in at send time.
LIVE: dict[str, Any] = {
    "email": Real("new_email"),
    "password": Real("password"),
    "identifier": Real("email"),
    "token": Real("token"),
    "message": "hello",
    "current_password": Real("password"),
    "new_password": Real("new_password"),
    "new_email": Real("new_email"),
}


def live_body(fields: tuple[str, ...]) -> dict[str, Any]:
    """The body a well-behaved client sends to an endpoint with these fields."""
    return {name: LIVE[name] for name in fields if name in LIVE}


def hostile_values(name: str) -> st.SearchStrategy[Any]:
    """Values for one field that break its rules: odd ones, or anything JSON can carry."""
    return st.one_of(ODD.get(name, nasty_text), nasty_text, json_values)


@st.composite
def bodies(draw: st.DrawFn, fields: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object for an endpoint: valid, valid but for a field or two, or anything."""
    mode = draw(st.sampled_from(["live", "valid", "valid", "mutated", "mutated", "random"]))
    body: dict[str, Any] = {}
    if mode == "live":
        body = live_body(fields)
    elif mode == "random":
        body = draw(st.fixed_dictionaries({}, optional={n: hostile_values(n) for n in fields}))
    else:
        body = {n: draw(VALID[n]) for n in fields if n in VALID}
        optional = [n for n in ("display_name", "phone") if n in body]
        for name in optional:
            if draw(st.booleans()):
                del body[name]
        if mode == "mutated" and fields:
            for name in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2)):
                if draw(st.integers(0, 4)) == 0:
                    body.pop(name, None)
                else:
                    body[name] = draw(hostile_values(name))
    extra = draw(st.dictionaries(short_text, json_values, max_size=2))
    return {**extra, **body}


# -- requests ---------------------------------------------------------------------------------

JSON_TYPES = [
    None,
    "application/json",
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/problem+json",
    "application/json; charset=latin-1",
]
OTHER_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "",
    ";",
    "application/json\x00",
]
latin1_text = st.text(st.characters(max_codepoint=255, exclude_characters="\r\n"), max_size=60)
cookie_safe = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=";,"), max_size=70
)
cookie_values = st.one_of(
    tokens,
    cookie_safe,
    latin1_text,
    st.sampled_from(["", '""', '"a\\"b"', "a b", "=", "deleted", "a" * 1800]),
)
cookie_names = st.one_of(
    st.sampled_from(["cc_auth", "cc_app", "cc_auth", "cc_app", "CC_AUTH", "_ga", "$Version"]),
    st.sampled_from(["expires", "path", "", "=", "a@b", "x/y", "q?", "(", "{k}", "a,b", "a b"]),
)
cookie_pairs = st.lists(st.tuples(cookie_names, cookie_values), max_size=4)
long_value = st.builds(
    # Under the header limits (8 KiB a line, 32 KiB in all, as nginx): issue 13 point 3.
    lambda unit, n: unit * n,
    st.sampled_from(["a", "\xe9", "\x00"]),
    st.integers(1000, 7_000),
)
header_values = st.one_of(latin1_text, long_value)
user_agents = st.one_of(
    st.sampled_from(["Mozilla/5.0 \x00", "\x00", "a\x00b" * 100, "\xff\xfe", "curl/8 \x1b[2J"]),
    header_values,
)
forwarded = st.one_of(
    latin1_text,
    st.lists(
        st.one_of(
            st.ip_addresses().map(str), st.sampled_from(["unknown", "127.0.0.1", "::1", "1.2.3"])
        ),
        max_size=5,
    ).map(", ".join),
)
request_ids = st.one_of(
    latin1_text, st.uuids().map(str), st.uuids().map(lambda u: "{" + u.hex.upper() + "}")
)
query_strings = st.one_of(
    st.just(""),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).map(
        lambda q: "?" + "".join(c if c.isalnum() or c in "=&" else f"%{ord(c):02X}" for c in q)
    ),
)
BODY_TEMPLATES = [
    '{{"{f}": "a@b.co", "{f}": "dup@b.co", "password": "Pw-1234567"}}',
    '\ufeff{{"{f}": "x"}}',
    '{{"{f}": ' + "9" * 5000 + "}}",
    '{{"{f}": 1e999999}}',
    '{{"{f}": NaN}}',
    '{{"{f}": "\\ud800"}}',
    '{{"{f}": "\\udfff\\ud800"}}',
    '{{"{f}": "\\u0000"}}',
    '{{"{f}": "a\\u0000b"}}',
    '{{"{f}": ' + "[" * 900 + "]" * 900 + "}}",
    '{{"{f}": "x"}} trailing',
    '{{"{f}": "x"',
    "  \n\t ",
    '{{"{f}": "\\x"}}',
    "{{'{f}': 'x'}}",
    '[{{"{f}": "x"}}]',
    '"{f}"',
]


@dataclass
class Fuzzed:
    """One generated request: a body of some kind, headers, cookies and a query string."""

    kind: str  # json, json_utf8, chunked, raw, template, none
    obj: dict[str, Any] | None = None
    raw: bytes | None = None
    content_type: str | None = None
    cookies: list[tuple[str, str]] = field(default_factory=list)
    raw_cookie: str | None = None
    session: str = "none"  # none, alone, first, last
    headers: dict[str, str] = field(default_factory=dict)
    query: str = ""


@st.composite
def fuzzed_requests(draw: st.DrawFn, fields: tuple[str, ...], session: bool) -> Fuzzed:
    """A request for an endpoint with these body fields (and maybe a live session)."""
    names = [*fields, "x", "__proto__"] if fields else ["x", "message", "email"]
    kind = draw(
        st.sampled_from(
            ["json", "json", "json", "json", "json_utf8", "chunked", "raw", "template", "none"]
        )
    )
    fz = Fuzzed(kind=kind)
    if kind in ("json", "json_utf8", "chunked"):
        fz.obj = draw(bodies(fields))
    elif kind == "raw":
        fz.raw = draw(st.binary(max_size=300))
    elif kind == "template":
        template = draw(st.sampled_from(BODY_TEMPLATES))
        fz.raw = template.format(f=draw(st.sampled_from(names))).encode("utf-8", "surrogatepass")
    weight = draw(st.integers(0, 9))
    if weight < 7:
        fz.content_type = draw(st.sampled_from(JSON_TYPES))
    else:
        fz.content_type = draw(st.sampled_from(OTHER_TYPES) if weight < 9 else latin1_text)
    if draw(st.integers(0, 9)) == 0:
        fz.raw_cookie = draw(latin1_text)
    else:
        fz.cookies = draw(cookie_pairs)
    if session:
        fz.session = draw(st.sampled_from(["none", "alone", "alone", "first", "last"]))
    for name, strategy in (
        ("X-Forwarded-For", forwarded),
        ("X-Request-ID", request_ids),
        ("User-Agent", user_agents),
        ("Accept", latin1_text),
        ("X-Fuzz", header_values),
    ):
        if draw(st.integers(0, 2)):
            fz.headers[name] = draw(strategy)
    fz.query = draw(query_strings)
    return fz


# Live values an endpoint's test does not provide itself.
FALLBACK: dict[str, Callable[[], str]] = {
    "new_email": random_email,
    "email": random_email,
    "password": strong_password,
    "new_password": strong_password,
    "token": lambda: "",
}


def _fill(value: Any, real: dict[str, str]) -> Any:
    """Replace Real placeholders (at any depth) by the live values."""
    if isinstance(value, Real):
        return real[value.what] if value.what in real else FALLBACK[value.what]()
    if isinstance(value, dict):
        return {k: _fill(v, real) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, real) for v in value]
    return value


@dataclass
class Sent:
    """What went out, for the checks and for the failure message."""

    method: str
    path: str
    body: bytes | None
    obj: dict[str, Any] | None
    headers: list[tuple[str, str]]
    session_alone: bool
    session_token: str | None


def send(
    server: Server, method: str, path: str, fz: Fuzzed, real: dict[str, str]
) -> tuple[Sent, Response]:
    """Send one fuzzed request on its own connection and read the whole answer."""
    obj = _fill(fz.obj, real) if fz.obj is not None else None
    body: bytes | None = fz.raw
    if obj is not None:
        ascii_only = fz.kind != "json_utf8"
        body = json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    headers: list[tuple[str, str]] = []
    if fz.content_type is not None:
        headers.append(("Content-Type", fz.content_type))
    pairs = list(fz.cookies)
    token = real.get("session")
    if token and fz.session != "none":
        if fz.session == "alone":
            pairs = [("cc_auth", token)]
        elif fz.session == "first":
            pairs.insert(0, ("cc_auth", token))
        else:
            pairs.append(("cc_auth", token))
    if fz.raw_cookie is not None and not pairs:
        headers.append(("Cookie", fz.raw_cookie))
    elif pairs:
        headers.append(("Cookie", "; ".join(f"{n}={v}" for n, v in pairs)))
    headers.extend(fz.headers.items())
    sent = Sent(
        method,
        path + fz.query,
        body,
        obj,
        headers,
        session_alone=fz.session == "alone" and bool(token),
        session_token=token,
    )
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    started = time.monotonic()
    try:
        conn.putrequest(method, sent.path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value.encode("latin-1"))
        if fz.kind == "chunked" and body is not None:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for start in range(0, len(body), 1000):
                piece = body[start : start + 1000]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
        raw = conn.getresponse()
        response = Response(raw.status, raw.msg, raw.read(), time.monotonic() - started)
    finally:
        conn.close()
    return sent, response


HOSTILE_HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11)\x00\x01",
    "X-Forwarded-For": "203.0.113.9, not-an-ip, ::1",
    "X-Request-ID": "rid\x00 rid=forged",
    "Accept": "\xff" * 200,
}
# Cookies other software on the same site may set; names the cookie RFC does not allow.
HOSTILE_COOKIES = [("a@b", "1"), ("=", "="), ("x/y", "2"), ("cc_app", "short")]

# -- checks -----------------------------------------------------------------------------------

Check = Callable[[Sent, Response], None]


@dataclass(frozen=True)
class Endpoint:
    """One endpoint: how to call it, which errors it may answer, what success looks like."""

    method: str
    path: str
    fields: tuple[str, ...]
    errors: dict[int, set[str]]
    success: dict[int, Check]
    session: bool = False


def _json(response: Response) -> dict[str, Any]:
    content_type = response.header("Content-Type") or ""
    assert content_type.startswith("application/json"), content_type
    body = response.json()
    assert isinstance(body, dict), body
    return body


def _ok(expected: dict[str, Any]) -> Check:
    def check(sent: Sent, response: Response) -> None:
        assert _json(response) == expected

    return check


def _login_ok(sent: Sent, response: Response) -> None:
    assert _json(response) == {"ok": True}
    cookie = response.cookie("cc_auth")
    assert cookie is not None and len(cookie[0]) >= 22, response.headers
    assert cookie[0] != sent.session_token
    assert "httponly" in cookie[1] and cookie[1].get("samesite") == "Lax", cookie


def _logout_ok(sent: Sent, response: Response) -> None:
    # API.md Additions: the answer counts the sessions that ended (0 or 1 for local).
    assert _json(response) in (
        {"ok": True, "revoked_sessions": 0},
        {"ok": True, "revoked_sessions": 1},
    )
    cookie = response.cookie("cc_auth")
    assert cookie is not None and cookie[1].get("max-age") == "0", response.headers


def _forgot_ok(sent: Sent, response: Response) -> None:
    body = _json(response)
    assert body.get("ok") is True, body
    assert set(body) <= {"ok", "debug_token", "debug_ttl"}, body
    if "debug_token" in body:
        assert isinstance(body["debug_token"], str) and len(body["debug_token"]) >= 40, body
        assert isinstance(body["debug_ttl"], int), body


def _revoked_ok(sent: Sent, response: Response) -> None:
    body = _json(response)
    assert set(body) == {"ok", "revoked_sessions"} and body["ok"] is True, body
    assert isinstance(body["revoked_sessions"], int) and body["revoked_sessions"] >= 0, body


def _chat_ok(sent: Sent, response: Response) -> None:
    content_type = response.header("Content-Type") or ""
    assert content_type.startswith("application/x-ndjson"), content_type
    assert response.body.endswith(b"\n"), response.body[-200:]
    # NDJSON lines end at b"\n" only: U+0085 or U+2028 inside a string are not line breaks.
    lines = [json.loads(line) for line in response.body.split(b"\n")[:-1]]
    assert all(isinstance(line, dict) for line in lines), lines
    assert lines and lines[-1].get("done") is True, lines
    assert not [line for line in lines if "error" in line], lines
    text = "".join(line["text"] for line in lines if "text" in line)
    if sent.obj is not None and isinstance(sent.obj.get("message"), str):
        assert text == "Echo: " + sent.obj["message"], (text, sent.obj)


def _me_ok(sent: Sent, response: Response) -> None:
    body = _json(response)
    assert body.get("ok") is True and set(body) == {"ok", "user"}, body
    user = body["user"]
    assert set(user) == {
        "id",
        "uid",
        "email",
        "phone",
        "display_name",
        "is_active",
        "email_verified",
        "mfa_enabled",
    }, user
    assert user["is_active"] is True and "@" in user["email"], user
    uuid.UUID(user["uid"])


def _profile_ok(sent: Sent, response: Response) -> None:
    _me_ok(sent, response)
    user = response.json()["user"]
    name = user["display_name"]
    assert name is None or (0 < len(name) <= 64 and name.isprintable()), user
    assert user["phone"] is None or user["phone"].lstrip("+").isdigit(), user


def _mfa_setup_ok(sent: Sent, response: Response) -> None:
    body = _json(response)
    assert set(body) == {"ok", "secret", "otpauth_uri"} and body["ok"] is True, body
    assert len(body["secret"]) == 32 and body["secret"].isalnum(), body
    assert body["otpauth_uri"].startswith("otpauth://totp/"), body


def _health_ok(sent: Sent, response: Response) -> None:
    assert _json(response) == {"ok": True, "redis": True, "db": True}


def _test_ok(sent: Sent, response: Response) -> None:
    body = _json(response)
    assert set(body) == {"timestamp", "request_id"}, body
    assert isinstance(body["timestamp"], float), body
    assert body["request_id"] == response.header("X-Request-ID"), body


ENDPOINTS = {
    "register": Endpoint(
        "POST",
        "/auth/register",
        ("email", "password", "display_name", "phone"),
        {
            **BODY_ERRORS,
            **MEDIA_ERRORS,
            400: BODY_ERRORS[400] | {"invalid_email", "weak_password", "invalid_phone"},
            409: {"email_taken", "phone_taken"},
        },
        {201: _ok({"ok": True})},
    ),
    "login": Endpoint(
        "POST",
        "/auth/login",
        ("identifier", "password"),
        {**BODY_ERRORS, **MEDIA_ERRORS, 401: {"invalid_credentials"}},
        {200: _login_ok},
    ),
    # Since issue 13 logout reads its (optional) body: a non-JSON one is a 415, not a logout.
    "logout": Endpoint(
        "POST",
        "/auth/logout",
        (),
        {**BODY_ERRORS, **MEDIA_ERRORS},
        {200: _logout_ok},
        session=True,
    ),
    "forgot": Endpoint(
        "POST",
        "/auth/password/forgot",
        ("identifier", "email"),
        {**BODY_ERRORS, **MEDIA_ERRORS},
        {200: _forgot_ok},
    ),
    "reset": Endpoint(
        "POST",
        "/auth/password/reset",
        ("token", "password"),
        {
            **BODY_ERRORS,
            **MEDIA_ERRORS,
            400: BODY_ERRORS[400] | {"weak_password", "invalid_token"},
        },
        {200: _revoked_ok},
    ),
    "change_anonymous": Endpoint(
        "POST",
        "/auth/password/change",
        ("current_password", "new_password"),
        {401: {"unauthorized"}},
        {},
    ),
    "change": Endpoint(
        "POST",
        "/auth/password/change",
        ("current_password", "new_password"),
        {
            **BODY_ERRORS,
            **MEDIA_ERRORS,
            400: BODY_ERRORS[400] | {"weak_password"},
            401: {"invalid_credentials", "unauthorized"},
        },
        {200: _revoked_ok},
        session=True,
    ),
    "chat": Endpoint(
        "POST",
        "/deepseek_chat",
        ("message",),
        {
            **BODY_ERRORS,
            **MEDIA_ERRORS,
            400: BODY_ERRORS[400] | {"empty_message", "message_too_long"},
        },
        {200: _chat_ok},
    ),
    "reset_chat": Endpoint(
        "POST",
        "/reset_chat",
        (),
        {},
        {200: _ok({"ok": True, "status": "Reset chat history successfully"})},
    ),
    "me": Endpoint("GET", "/auth/me", (), {401: {"unauthorized"}}, {200: _me_ok}, session=True),
    "profile": Endpoint(
        "PATCH",
        "/auth/me",
        ("display_name", "phone"),
        {
            **BODY_ERRORS,
            **MEDIA_ERRORS,
            400: BODY_ERRORS[400] | {"invalid_phone"},
            401: {"unauthorized"},
            409: {"phone_taken"},
        },
        {200: _profile_ok},
        session=True,
    ),
    "login_mfa": Endpoint(
        "POST",
        "/auth/login/mfa",
        ("code", "recovery_code"),
        {**BODY_ERRORS, **MEDIA_ERRORS, 401: {"mfa_expired", "invalid_code"}},
        {200: _login_ok},
    ),
    "mfa_setup": Endpoint(
        "POST",
        "/auth/mfa/totp/setup",
        ("password",),
        {
            **BODY_ERRORS,
            **MEDIA_ERRORS,
            401: {"invalid_credentials", "unauthorized"},
            409: {"mfa_enabled", "mfa_setup_busy"},
        },
        {200: _mfa_setup_ok},
        session=True,
    ),
    "mfa_confirm": Endpoint(
        "POST",
        "/auth/mfa/totp/confirm",
        ("code",),
        {
            **BODY_ERRORS,
            **MEDIA_ERRORS,
            400: BODY_ERRORS[400] | {"invalid_code"},
            401: {"unauthorized"},
            409: {"no_mfa_setup"},
        },
        {},
        session=True,
    ),
    "mfa_disable": Endpoint(
        "POST",
        "/auth/mfa/totp/disable",
        ("password", "code", "recovery_code"),
        {
            **BODY_ERRORS,
            **MEDIA_ERRORS,
            401: {"invalid_credentials", "unauthorized", "mfa_required", "invalid_code"},
            409: {"mfa_not_enabled"},
        },
        {200: _ok({"ok": True})},
        session=True,
    ),
    "verify_email": Endpoint(
        "POST",
        "/auth/email/verify",
        ("token",),
        {**BODY_ERRORS, **MEDIA_ERRORS, 400: BODY_ERRORS[400] | {"invalid_token"}},
        {200: _ok({"ok": True})},
    ),
    "resend": Endpoint(
        "POST",
        "/auth/email/resend",
        ("identifier", "email"),
        {**BODY_ERRORS, **MEDIA_ERRORS},
        {200: _ok({"ok": True})},
    ),
    "email_change": Endpoint(
        "POST",
        "/auth/email/change",
        ("password", "new_email"),
        {
            **BODY_ERRORS,
            **MEDIA_ERRORS,
            400: BODY_ERRORS[400] | {"invalid_email"},
            401: {"invalid_credentials", "unauthorized"},
            409: {"email_taken"},
        },
        {200: _ok({"ok": True})},
        session=True,
    ),
    "healthz": Endpoint("GET", "/auth/healthz", (), {}, {200: _health_ok}),
    "test": Endpoint("GET", "/test", (), {}, {200: _test_ok}),
}


def check_answer(endpoint: Endpoint, sent: Sent, response: Response) -> None:
    """The answer is the endpoint's success shape or one of its documented errors."""
    context = (
        f"{sent.method} {sent.path} headers={sent.headers!r} body={(sent.body or b'')[:400]!r}"
    )
    assert response.status < 500, f"{response!r} for {context}"
    rid = response.header("X-Request-ID") or ""
    assert str(uuid.UUID(rid)) == rid, f"X-Request-ID {rid!r} for {context}"
    incoming = dict(sent.headers).get("X-Request-ID", "")
    if incoming and len(incoming) <= 64:
        try:
            assert rid == str(uuid.UUID(incoming)), (rid, incoming)
        except ValueError:
            pass
    for name, _, attrs in response.set_cookies():
        assert name in ("cc_auth", "cc_app", "cc_device"), f"cookie {name!r} for {context}"
        assert "httponly" in attrs and attrs.get("path") == "/", f"{attrs} for {context}"
        assert attrs.get("samesite") == "Lax", f"{attrs} for {context}"
    if sent.path.startswith("/auth/"):
        for name, value in SECURITY_HEADERS.items():
            assert response.header(name) == value, f"{name}: {response.header(name)!r} {context}"
    over_limit = sent.body is not None and len(sent.body) > MAX_BODY
    if over_limit and endpoint.errors.get(413):
        refused = (413, 415, 401) if endpoint.session else (413, 415)
        assert response.status in refused, f"{response!r} for {context}"
    if response.status in endpoint.success:
        try:
            endpoint.success[response.status](sent, response)
        except AssertionError as exc:
            raise AssertionError(f"bad success answer {response!r} for {context}: {exc}") from exc
        return
    codes = endpoint.errors.get(response.status)
    assert codes, f"status {response.status} not expected: {response!r} for {context}"
    try:
        body = _json(response)
    except (AssertionError, ValueError) as exc:
        raise AssertionError(f"no JSON envelope: {response!r} for {context}") from exc
    assert body.get("ok") is False, f"{body} for {context}"
    assert isinstance(body.get("error"), str) and body["error"].strip(), f"{body} for {context}"
    assert body.get("code") in codes, f"code {body.get('code')!r} not in {codes}: {context}"


def log_problems(lines: list[str]) -> list[str]:
    """Log lines that are errors, tracebacks, or not one well-formed escaped line each."""
    return [
        line
        for line in lines
        if not LOG_LINE_RE.match(line)
        or CONTROL_RE.search(line)
        or "Traceback" in line
        or "unhandled error" in line
    ]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=SETUPS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server per setup, limits out of the way, reset tokens in the forgot answer."""
    yield from shared_server(
        request, tmp_path_factory, {**ALL_LIMITS_RAISED, "DEBUG_RETURN_RESET_TOKEN": "1"}
    )


@pytest.fixture(scope="module")
def plain(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """An embedded server without debug tokens: forgot looks the account up after answering."""
    yield from shared_server(request, tmp_path_factory, ALL_LIMITS_RAISED, "embedded")


@dataclass
class Account:
    """A registered user and, once logged in, a session of theirs."""

    email: str
    password: str
    session: str = ""


def new_account(server: Server, login: bool = False) -> Account:
    """Register a fresh user (and log in when asked)."""
    account = Account(random_email(), strong_password())
    client = server.client()
    assert client.register(account.email, account.password).status == 201
    if login:
        assert client.login(account.email, account.password).status == 200
        account.session = client.cookies["cc_auth"]
    return account


def fresh_reset_token(server: Server, account: Account) -> str:
    """A live reset token for the account (DEBUG_RETURN_RESET_TOKEN=1)."""
    answer = server.client().post("/auth/password/forgot", {"identifier": account.email})
    assert answer.status == 200, answer
    return str(answer.json()["debug_token"])


def seeds(endpoint: Endpoint) -> list[Fuzzed]:
    """Examples every run tries: a well-behaved request, then with hostile headers, cookies."""
    session = "alone" if endpoint.session else "none"
    body = live_body(endpoint.fields)

    def seed(obj: dict[str, Any] = body, **kwargs: Any) -> Fuzzed:
        return Fuzzed("json", dict(obj), content_type="application/json", **kwargs)

    visitor = "v" * 32
    return [
        seed(session=session),
        seed(session=session, obj={**body, "pad": "a" * 70_000}),
        Fuzzed("chunked", {**body, "pad": "é" * 40_000}, session=session),
        seed(session=session, headers=dict(HOSTILE_HEADERS)),
        seed(session="last" if endpoint.session else "none", cookies=list(HOSTILE_COOKIES)),
        seed(
            session="first" if endpoint.session else "none",
            cookies=[("cc_app", visitor), ("cc_auth", "x" * 129)],
        ),
    ]


def fuzz_endpoint(server: Server, name: str, live: Callable[[Fuzzed], dict[str, str]]) -> None:
    """Run the endpoint's examples, then check the log and the records they stored."""
    endpoint = ENDPOINTS[name]
    first_line = len(server.logs)
    greenlets = server_stats(server)["greenlets"]
    # Records other tests left behind are theirs to report: only new violations count here.
    earlier = set(schema_violations(sql_tables(server)))

    def one(fz: Fuzzed) -> None:
        real = live(fz)
        sent, response = send(server, endpoint.method, endpoint.path, fz, real)
        check_answer(endpoint, sent, response)
        if name == "me" and sent.session_alone:
            assert response.status == 200, response

    run = given(fz=fuzzed_requests(endpoint.fields, endpoint.session))(one)
    for seed in seeds(endpoint):
        run = example(fz=seed)(run)
    FUZZ(run)()
    # Mail and the forgot lookup run in background greenlets: let them finish and log.
    wait_until(
        lambda: server_stats(server)["greenlets"] <= greenlets,
        10,
        interval=0.1,
        what="the background jobs to finish",
    )
    problems = log_problems(server.logs[first_line:])
    assert not problems, "\n".join(problems[:20])
    violations = [v for v in schema_violations(sql_tables(server)) if v not in earlier]
    assert not violations, "\n".join(violations[:20])


# -- tests ------------------------------------------------------------------------------------


def test_register(server: Server) -> None:
    """Registration: valid, odd and hostile accounts are stored clean or refused."""
    fuzz_endpoint(server, "register", lambda fz: {"password": strong_password()})


def test_login(server: Server) -> None:
    """Login with the live account's credentials among hostile ones."""
    account = new_account(server)
    fuzz_endpoint(
        server, "login", lambda fz: {"email": account.email, "password": account.password}
    )


def test_logout(server: Server) -> None:
    """Logout answers 200 whatever it is sent, with or without a live session."""

    def live(fz: Fuzzed) -> dict[str, str]:
        """A fresh session per example that carries one: logout ends it."""
        if fz.session == "none":
            return {}
        return {"session": new_account(server, login=True).session}

    fuzz_endpoint(server, "logout", live)


def test_forgot(server: Server) -> None:
    """Forgot with the reset token in the answer (the lookup inside the request)."""
    account = new_account(server)
    fuzz_endpoint(server, "forgot", lambda fz: {"email": account.email})


def test_forgot_answered_before_the_lookup(plain: Server) -> None:
    """Forgot as in production: the lookup runs after the answer, failures only in the log."""
    account = new_account(plain)
    fuzz_endpoint(plain, "forgot", lambda fz: {"email": account.email})


def test_reset(server: Server) -> None:
    """Reset with live, stale and hostile tokens and passwords."""
    account = new_account(server)

    def live(fz: Fuzzed) -> dict[str, str]:
        """A live token when the example asks for one."""
        wants = fz.obj is not None and Real("token") in fz.obj.values()
        token = fresh_reset_token(server, account) if wants else ""
        return {"token": token, "password": strong_password()}

    fuzz_endpoint(server, "reset", live)


def test_change_password(server: Server) -> None:
    """Password change with a live session (a fresh user per example) or without."""

    def live(fz: Fuzzed) -> dict[str, str]:
        """A fresh logged-in user per example with a session: a change alters it."""
        if fz.session == "none":
            return {"password": strong_password()}
        account = new_account(server, login=True)
        return {"session": account.session, "password": account.password}

    fuzz_endpoint(server, "change", live)


def test_change_password_without_session(plain: Server) -> None:
    """Password change without a session: always the 401, whatever the body."""
    fuzz_endpoint(plain, "change_anonymous", lambda fz: {"password": strong_password()})


def test_chat_echo(server: Server) -> None:
    """Chat through the offline echo provider: the echo is exactly the message."""
    fuzz_endpoint(server, "chat", lambda fz: {})


def test_reset_chat(plain: Server) -> None:
    """Reset chat answers 200 whatever it is sent."""
    fuzz_endpoint(plain, "reset_chat", lambda fz: {})


def test_me(server: Server) -> None:
    """GET /auth/me with hostile cookies and headers; a live session alone is a 200."""
    viewer = new_account(server, login=True)
    fuzz_endpoint(server, "me", lambda fz: {"session": viewer.session})


def test_profile(server: Server) -> None:
    """PATCH /auth/me with odd and hostile names and phones: stored clean or refused."""
    viewer = new_account(server, login=True)
    fuzz_endpoint(server, "profile", lambda fz: {"session": viewer.session})


def test_verify_email(server: Server) -> None:
    """POST /auth/email/verify with stale and hostile tokens: 400, never more."""
    fuzz_endpoint(server, "verify_email", lambda fz: {})


def test_resend_verification(plain: Server) -> None:
    """POST /auth/email/resend answers 200 whatever identifier it is sent."""
    account = new_account(plain)
    fuzz_endpoint(plain, "resend", lambda fz: {"email": account.email})


def test_email_change(server: Server) -> None:
    """POST /auth/email/change with a live session (a fresh user per example) or without."""

    def live(fz: Fuzzed) -> dict[str, str]:
        if fz.session == "none":
            return {"password": strong_password()}
        account = new_account(server, login=True)
        return {"session": account.session, "password": account.password}

    fuzz_endpoint(server, "email_change", live)


def test_login_mfa(server: Server) -> None:
    """POST /auth/login/mfa without a live cc_mfa: 401 or 400, whatever the codes."""
    fuzz_endpoint(server, "login_mfa", lambda fz: {})


def test_mfa_endpoints(server: Server) -> None:
    """Setup, confirm and disable with hostile passwords and codes, with and without a
    session: documented answers only, nothing stored that breaks the schema."""
    for name in ("mfa_setup", "mfa_confirm", "mfa_disable"):

        def live(fz: Fuzzed) -> dict[str, str]:
            if fz.session == "none":
                return {"password": strong_password()}
            account = new_account(server, login=True)
            return {"session": account.session, "password": account.password}

        fuzz_endpoint(server, name, live)


def test_healthz(plain: Server) -> None:
    """GET /auth/healthz: both dependencies up, whatever the request carries."""
    fuzz_endpoint(plain, "healthz", lambda fz: {})


def test_test_route(plain: Server) -> None:
    """GET /test: timestamp and request id, whatever the request carries."""
    fuzz_endpoint(plain, "test", lambda fz: {})
