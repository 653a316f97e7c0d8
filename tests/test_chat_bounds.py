"""Issue 13 point 6: chat lines any line splitter reads right, and bounded provider streams."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import cloudchat
from tests.conftest import shared_server
from tests.fakeprovider import FakeProvider, Reply
from tests.helpers import Server
from tests.test_chat import assert_streamed, chat, chat_env, echo_text, turns

REPLY_CAP = 5000


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, provider: FakeProvider
) -> Iterator[Server]:
    """An embedded server chatting with the fake provider, replies capped at REPLY_CAP."""
    overrides = chat_env(provider, CHAT_MAX_REPLY_CHARS=str(REPLY_CAP))
    yield from shared_server(request, tmp_path_factory, overrides, setup="embedded")


def test_line_separators_are_escaped(server: Server, fake: FakeProvider) -> None:
    """U+2028, U+2029 and U+0085 go out escaped: str.splitlines sees one object per line."""
    deltas = ["a\u2028b", "c\u2029d", "e\x85f"]
    fake.script(Reply(deltas=deltas), Reply(deltas=deltas))
    assert_streamed(chat(server, server.client(), "separators"), "".join(deltas))
    answer = server.client().post("/deepseek_chat", {"message": "separators"})
    assert answer.status == 200, answer
    raw = answer.body
    for forbidden in ("\u2028", "\u2029", "\x85"):
        assert forbidden.encode() not in raw, raw
    text = raw.decode("utf-8")
    assert text.splitlines() == text.rstrip("\n").split("\n"), text
    assert "\\u2028" in text and "\\u2029" in text and "\\u0085" in text, text


def test_json_bytes_escapes_line_separators() -> None:
    """The one JSON writer escapes the three separators and nothing else changes."""
    out = cloudchat._json_bytes({"text": "x\u2028y\u2029z\x85é"})
    assert out == b'{"text":"x\\u2028y\\u2029z\\u0085\xc3\xa9"}'
    assert cloudchat.json.loads(out) == {"text": "x\u2028y\u2029z\x85é"}


def test_endless_reply_is_cut_off_and_not_kept(server: Server, fake: FakeProvider) -> None:
    """A reply beyond CHAT_MAX_REPLY_CHARS ends with an error line; nothing joins the history."""
    client = server.client()
    fake.script(Reply(deltas=["x" * 1000] * 8), Reply())
    result = chat(server, client, "tell me everything")
    assert result.status == 200
    assert "error" in result.lines[-1], result.lines[-3:]
    assert not [line for line in result.lines if line.get("done")], result.lines[-3:]
    assert len(result.text) <= REPLY_CAP
    assert_streamed(chat(server, client, "again"), echo_text("again"))
    assert turns(fake.requests[-1]) == [
        ("system", "You are a helpful assistant."),
        ("user", "again"),
    ]


def test_endless_reasoning_is_cut_off(server: Server, fake: FakeProvider) -> None:
    """Reasoning counts against the same bound, on its own."""
    fake.script(Reply(reasoning=["r" * 1000] * 8, deltas=["short"]))
    result = chat(server, server.client(), "think forever")
    assert "error" in result.lines[-1], result.lines[-3:]


def test_oversized_event_is_refused(server: Server, fake: FakeProvider) -> None:
    """One SSE event of more than 1 MiB is not a token: an error line, nothing kept."""
    client = server.client()
    fake.script(Reply(deltas=["ok ", "y" * (1024 * 1024 + 10)]), Reply())
    result = chat(server, client, "huge event")
    assert result.status == 200
    assert "error" in result.lines[-1], result.lines[-2:]
    assert_streamed(chat(server, client, "after"), echo_text("after"))
    assert ("user", "huge event") not in turns(fake.requests[-1])
