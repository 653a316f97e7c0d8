"""config.example.env documents every variable the server reads, with its true default."""

from __future__ import annotations

import re

import cloudchat
from tests.helpers import ROOT

EXAMPLE = ROOT / "config.example.env"


def _documented() -> dict[str, str]:
    """NAME -> value of every `NAME=value` line, commented out or not."""
    found = {}
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_every_variable_read_is_documented() -> None:
    read = cloudchat.Config.variable_names()
    assert len(read) > 30
    missing = sorted(read - set(_documented()))
    assert not missing, f"not in config.example.env: {missing}"
    unknown = sorted(set(_documented()) - read)
    assert not unknown, f"documented but never read: {unknown}"


def test_the_dataclass_is_the_one_place_of_every_default() -> None:
    """Issue 14: Config() and an empty environment agree (trusted proxies included)."""
    assert cloudchat.Config() == cloudchat.Config.from_env({})
    assert [str(n) for n in cloudchat.Config().trusted_proxies] == ["127.0.0.1/32", "::1/128"]


def test_uncommented_values_are_the_defaults() -> None:
    """Loading the example's active lines gives exactly the built-in defaults."""
    active = {}
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            active[match.group(1)] = match.group(2)
    assert cloudchat.Config.from_env(active) == cloudchat.Config.from_env({})


def test_secrets_stay_out_of_repr() -> None:
    cfg = cloudchat.Config.from_env(
        {
            "DATABASE_URL": "postgresql://u:db-secret@127.0.0.1/x",
            "REDIS_URL": "redis://:redis-secret@127.0.0.1:6379/0",
            "SMTP_PASS": "smtp-secret",
        }
    )
    text = repr(cfg)
    assert "db-secret" not in text and "redis-secret" not in text and "smtp-secret" not in text
