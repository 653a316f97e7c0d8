"""Issue 12's pure rules in process, no server: emails (8), passwords (7), signed visitor ids
(3) and device cookies (2)."""

from __future__ import annotations

import secrets
import string
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cloudchat

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
# A made-up value of the shape the old server adopted (token_urlsafe(24)); fixed, so that
# every xdist worker collects the same test ids.
OLD_SHAPE_ID = "q3Lx9vT0bWk2YfN7sR1dHc8uJp4ZaE6g"
# API.md "Emails": the characters besides letters and digits a local part may hold.
LOCAL_SPECIALS = "!#$%&'*+/=?^_`{|}~-"
# Not one of these belongs anywhere in an address (whitespace only around it, trimmed).
HOSTILE_CHARS = '",;<>@()[]\\\x00\x1b\x7f\u00a0\u200b\u202e\u2028\uff41\u212a\u00e9\u0130'

INVALID_EMAILS = {
    "comma-two-recipients": "Urgent-call-555-0100,victim@example.com",
    "semicolon": "a;b@example.com",
    "quoted-local-part": '"q"@example.com',
    "angle-brackets": "<a@example.com>",
    "space": "a b@example.com",
    "zero-width": "a\u200b@example.com",
    "bidi-override": "\u202ea@example.com",
    "control-escape": "a\x1b@example.com",
    "fullwidth": "\uff41@example.com",
    "kelvin-sign": "\u212a@example.com",
    "double-dot": "a..b@example.com",
    "leading-dot": ".a@example.com",
    "trailing-dot": "a.@example.com",
    "hyphen-first-label": "a@-example.com",
    "hyphen-last-label": "a@example-.com",
    "no-dot-in-domain": "a@example",
    "two-ats": "a@b@example.com",
    "empty-local-part": "@example.com",
    "local-part-of-65": "a" * 65 + "@example.com",
    "longer-than-254": "a@" + "b" * 250 + ".com",
    "nbsp-around": "\u00a0a@example.com\u00a0",
}
VALID_EMAILS = {
    "o'brien+tag@example.com": "o'brien+tag@example.com",
    "x@xn--bcher-kva.example": "x@xn--bcher-kva.example",
    " Mixed@Example.COM ": "mixed@example.com",
    "\ta.b-c_d@sub.example.co.uk\n": "a.b-c_d@sub.example.co.uk",
    "a" * 64 + "@example.com": "a" * 64 + "@example.com",
}


def policy(**changes: Any) -> cloudchat.PasswordPolicy:
    """A PasswordPolicy for a Config with these settings."""
    return cloudchat.PasswordPolicy(cloudchat.Config(**changes))


def _changed(text: str, index: int) -> str:
    """The text with the character at index replaced by another URL-safe one."""
    index %= len(text)
    return text[:index] + ("B" if text[index] == "A" else "A") + text[index + 1 :]


# -- point 8: email addresses ----------------------------------------------------------------


@pytest.mark.parametrize("raw", list(INVALID_EMAILS.values()), ids=list(INVALID_EMAILS))
def test_normalize_email_refuses(raw: str) -> None:
    """Point 8: anything outside API.md's ASCII dot-atom grammar is None."""
    assert cloudchat.normalize_email(raw) is None


@pytest.mark.parametrize("raw, stored", list(VALID_EMAILS.items()))
def test_normalize_email_accepts_trims_and_lowers(raw: str, stored: str) -> None:
    """Point 8: accepted addresses come back trimmed and lower-cased."""
    assert cloudchat.normalize_email(raw) == stored


@pytest.mark.parametrize("char", list(LOCAL_SPECIALS))
def test_every_special_character_of_the_grammar_is_accepted(char: str) -> None:
    """Point 8: each of API.md's local-part characters is accepted."""
    assert cloudchat.normalize_email(f"A{char}b@Example.com") == f"a{char}b@example.com"


def test_normalize_email_of_none() -> None:
    """Point 8: no address at all is None."""
    assert cloudchat.normalize_email(None) is None


@settings(max_examples=300, database=None, deadline=None)
@given(st.emails(), st.sampled_from(HOSTILE_CHARS), st.integers(min_value=0))
def test_one_hostile_character_anywhere_is_refused(email: str, char: str, where: int) -> None:
    """Point 8: one quote, separator, control, invisible or non-ASCII character voids it."""
    where %= len(email) + 1
    assert cloudchat.normalize_email(email[:where] + char + email[where:]) is None


@settings(max_examples=200, database=None, deadline=None)
@given(st.emails())
def test_normalize_email_accepts_dot_atom_addresses(email: str) -> None:
    """Point 8: every dot-atom address (hypothesis's emails(): API.md's grammar) is accepted."""
    assert cloudchat.normalize_email(email) == email.lower()


@pytest.mark.parametrize(
    "raw, found",
    [
        (" Mixed@Example.COM ", "mixed@example.com"),
        ('"q"@example.com', '"q"@example.com'),  # an old account can still sign in
        ("a b@example.com", "a b@example.com"),
    ],
)
def test_lookup_email_is_lenient_for_existing_accounts(raw: str, found: str) -> None:
    """Point 8: lookups trim and lower-case but accept addresses from before the grammar."""
    assert cloudchat.lookup_email(raw) == found


@pytest.mark.parametrize(
    "raw",
    ["no-at-sign", "a\x1b@example.com", "a\u200b@example.com", "\u202ea@example.com", ""],
    ids=["no-at", "control", "zero-width", "bidi", "empty"],
)
def test_lookup_email_refuses_what_is_not_printable(raw: str) -> None:
    """Point 8: a lookup never carries a control, zero-width or bidi character (to a log)."""
    assert cloudchat.lookup_email(raw) is None


# -- point 7: the password policy ------------------------------------------------------------


def test_no_composition_rule_by_default() -> None:
    """Point 7: letters only is fine by default."""
    assert policy().problem("correcthorsebatterystaple") is None
    assert policy().problem("onlyletterslong", "someone@example.com") is None


@pytest.mark.parametrize("password", ["short", "x" * 129, ""])
def test_length_rule(password: str) -> None:
    """Point 7: 8 to 128 characters."""
    assert "8 to 128" in (policy().problem(password) or "")


def test_lengths_at_the_bounds_are_fine() -> None:
    """Point 7: exactly 8 and exactly 128 characters pass."""
    assert policy().problem("zq7-vbn4") is None
    assert policy().problem("zq7-vbn4" * 16) is None


@pytest.mark.parametrize("password", ["PASSWORD", "Password123", "qwertyuiop", "password1"])
def test_common_rule(password: str) -> None:
    """Point 7: common passwords are refused case-insensitively, naming the rule."""
    assert "common" in (policy().problem(password) or "")


@pytest.mark.parametrize(
    "password",
    ["jane.doe@example.com", "JANE.DOE@EXAMPLE.COM", "my-jane.doe-pw", "XXJANE.DOEXX"],
)
def test_email_rule(password: str) -> None:
    """Point 7: equal to the email, or containing its local part, in any case."""
    assert "email" in (policy().problem(password, "jane.doe@example.com") or "")


def test_email_rule_needs_a_local_part_of_four() -> None:
    """Point 7: a 3-character local part is no rule; 4 characters is."""
    assert policy().problem("bob-likes-long-walks", "bob@example.com") is None
    assert "email" in (policy().problem("bobb-likes-long-walks", "bobb@example.com") or "")
    assert "email" in (policy().problem("bob@example.com", "bob@example.com") or "")


def test_site_name_rule() -> None:
    """Point 7: containing SITE_NAME (default CloudChat), any case; not below 4 characters."""
    assert "site name" in (policy().problem("my-CLOUDCHAT-pass") or "")
    assert "site name" in (policy(site_name="Acme Chat").problem("i love acme chat!") or "")
    assert policy(site_name="Acme Chat").problem("my-cloudchat-pass") is None
    assert policy(site_name="Abc").problem("xxabcxx-long-one") is None


def test_require_mix_rule() -> None:
    """Point 7: PASSWORD_REQUIRE_MIX=1 wants two of letters, digits, other characters."""
    mixed = policy(password_require_mix=True)
    for password in ("onlyletterslong", "1234567890123", "!!!!----????"):
        assert "two" in (mixed.problem(password) or ""), password
    assert mixed.problem("letters-and-other") is None
    assert mixed.problem("letters4and5digits") is None


def test_blocklist_file(tmp_path: Path) -> None:
    """Point 7: PASSWORD_BLOCKLIST_FILE entries (trimmed) are refused case-insensitively."""
    path = tmp_path / "blocklist.txt"
    path.write_text("Zebra-Tango-42\n  our office wifi key \n\n", encoding="utf-8")
    listed = policy(password_blocklist_file=str(path))
    assert "common" in (listed.problem("ZEBRA-tango-42") or "")
    assert "common" in (listed.problem("Our Office WiFi Key") or "")
    assert listed.problem("zebra-tango-43") is None
    assert policy().problem("zebra-tango-42") is None


def test_common_password_list() -> None:
    """Point 7: the shipped list is large, lower-case and has the usual suspects."""
    words = cloudchat.common_passwords()
    assert len(words) >= 3000
    assert {"password1", "password123", "qwertyuiop", "iloveyou"} <= words
    assert all(word == word.lower() for word in words)
    assert "correcthorsebatterystaple" not in words


# -- point 3: signed visitor ids -------------------------------------------------------------


def test_visitor_id_round_trip() -> None:
    """Point 3: an issued id is valid for its key and distinct from the next one."""
    first, second = cloudchat.new_visitor_id(KEY), cloudchat.new_visitor_id(KEY)
    assert first != second
    assert cloudchat.visitor_id_is_valid(KEY, first, 3600)
    assert cloudchat.visitor_id_is_valid(KEY, second, 3600)


def _signed_visitor_id(key: bytes, issued_at: int) -> str:
    """A visitor id as new_visitor_id makes it, with a chosen issue time."""
    payload = f"{secrets.token_urlsafe(16)}.{issued_at}"
    return f"{payload}.{cloudchat.sign(key, 'visitor', payload)}"


def test_visitor_id_with_a_wrong_key_or_purpose_is_invalid() -> None:
    """Point 3: an id signed with another key, or for another purpose, is not ours."""
    assert not cloudchat.visitor_id_is_valid(OTHER_KEY, cloudchat.new_visitor_id(KEY), 3600)
    payload = f"{secrets.token_urlsafe(16)}.{int(time.time())}"
    other_purpose = f"{payload}.{cloudchat.sign(KEY, 'device:1', payload)}"
    assert not cloudchat.visitor_id_is_valid(KEY, other_purpose, 3600)


@pytest.mark.parametrize("part", [0, 1, 2])
def test_tampered_visitor_id_is_invalid(part: int) -> None:
    """Point 3: changing any part of an issued id (random, time, signature) voids it."""
    parts = cloudchat.new_visitor_id(KEY).split(".")
    if part == 1:
        parts[1] = str(int(parts[1]) - 1)
    else:
        parts[part] = _changed(parts[part], 0)
    assert not cloudchat.visitor_id_is_valid(KEY, ".".join(parts), 3600)


@pytest.mark.parametrize(
    "value",
    ["A" * 32, OLD_SHAPE_ID, "", "a.b.c", "..", "A" * 22 + ".1." + "A" * 22],
)
def test_made_up_visitor_id_is_invalid(value: str) -> None:
    """Point 3: values the server did not issue are invalid."""
    assert not cloudchat.visitor_id_is_valid(KEY, value, 3600)


def test_visitor_id_too_old_is_invalid() -> None:
    """Point 3: an id older than max_age is invalid; a younger one is valid."""
    old = _signed_visitor_id(KEY, int(time.time()) - 1000)
    assert cloudchat.visitor_id_is_valid(KEY, old, 100_000)
    assert not cloudchat.visitor_id_is_valid(KEY, old, 100)
    assert not cloudchat.visitor_id_is_valid(KEY, cloudchat.new_visitor_id(KEY), -1)


# -- point 2: device cookies -----------------------------------------------------------------


def test_device_cookie_round_trip() -> None:
    """A device cookie names its account: the nonce back for that user id only."""
    value = cloudchat.new_device_cookie(KEY, 42)
    nonce = cloudchat.device_nonce(KEY, value, 42)
    assert nonce is not None and value.startswith(f"{nonce}.")
    assert cloudchat.device_nonce(KEY, value, 43) is None
    assert cloudchat.device_nonce(KEY, value, 4) is None
    assert cloudchat.device_nonce(OTHER_KEY, value, 42) is None
    assert cloudchat.new_device_cookie(KEY, 42) != value


@pytest.mark.parametrize("part", [0, 1])
def test_tampered_device_cookie_is_refused(part: int) -> None:
    """Changing the nonce or the signature of a device cookie voids it."""
    parts = cloudchat.new_device_cookie(KEY, 7).split(".")
    parts[part] = _changed(parts[part], -1 if part else 0)
    assert cloudchat.device_nonce(KEY, ".".join(parts), 7) is None


@pytest.mark.parametrize("value", [None, "", "A" * 45, "x.y", "A" * 22 + "." + "A" * 22])
def test_made_up_device_cookie_is_refused(value: str | None) -> None:
    """Values the server did not issue name no device."""
    assert cloudchat.device_nonce(KEY, value, 7) is None


# -- signatures ------------------------------------------------------------------------------


def test_sign_and_signature_matches() -> None:
    """sign is deterministic, 22 URL-safe characters, bound to key, purpose and payload."""
    signature = cloudchat.sign(KEY, "visitor", "payload")
    assert signature == cloudchat.sign(KEY, "visitor", "payload")
    assert len(signature) == 22
    assert set(signature) <= set(string.ascii_letters + string.digits + "-_")
    assert cloudchat.signature_matches(KEY, "visitor", "payload", signature)
    assert not cloudchat.signature_matches(OTHER_KEY, "visitor", "payload", signature)
    assert not cloudchat.signature_matches(KEY, "device:1", "payload", signature)
    assert not cloudchat.signature_matches(KEY, "visitor", "payload2", signature)
    assert not cloudchat.signature_matches(KEY, "visitor", "payload", _changed(signature, 0))
    # The purpose and the payload cannot trade characters.
    assert cloudchat.sign(KEY, "a", "b:c") != cloudchat.sign(KEY, "a:b", "c")
