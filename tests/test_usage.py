"""Issue 17: GET /chat/history, usage accounting (chat_usage), daily token budgets,
GET /chat/usage, the `usage` command, /metrics, /livez and LOG_FORMAT=json, against real
servers and the fake model provider (tests/fakeprovider.py)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import itertools
import json
import math
import re
import secrets
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import SETUPS, RedisDb, ServerFactory, shared_server, unavailable
from tests.deploy_stack import Nginx, find_binary
from tests.fakeprovider import FakeProvider, Reply, echo_text
from tests.helpers import (
    ALL_LIMITS_RAISED,
    REQUEST_TIMEOUT,
    Client,
    Server,
    assert_error,
    free_port,
    random_email,
    random_hex,
    register_and_login,
    run_cli,
    sql_rows,
    strong_password,
    wait_until,
)
from tests.test_chat import Chat, ChatStream, chat

CHAT = "/deepseek_chat"
KEY = "sk-test-usage-0123456789"
MODEL = "usage-test-model"
SYSTEM = "You are a helpful assistant."  # the default SYSTEM_PROMPT
MAX_HISTORY = 2
METRICS_TOKEN = "metrics-" + "t0k3n" * 8
NOT_FOUND = {"ok": False, "error": "Not found", "code": "not_found"}
STREAM_TIMEOUT = 10.0
RECORD_WAIT = 5.0
BUDGET = 250  # CHAT_DAILY_TOKENS_USER / _ANON of the `budgets` servers
PER_ANSWER = 100  # tokens every answer reports in the budget tests


def usage(prompt: int, completion: int) -> dict[str, int]:
    """A provider usage report."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def budget_reply(tokens: int = PER_ANSWER, **extra: Any) -> Reply:
    """The fake's echo answer reporting `tokens` tokens (60% prompt, 40% completion)."""
    prompt = tokens * 3 // 5
    return Reply(usage=usage(prompt, tokens - prompt), **extra)


def chat_env(provider: FakeProvider, **extra: str) -> dict[str, str | None]:
    """A server chatting with the fake as deepseek, every limit raised but the register-email
    one (1 an hour: what the metrics test trips), /metrics also open to METRICS_TOKEN."""
    return {
        **ALL_LIMITS_RAISED,
        "RATE_REGISTER_EMAIL": "1/3600",
        "DEEPSEEK_API_KEY": KEY,
        "DEEPSEEK_BASE_URL": provider.url(),
        "DEEPSEEK_MODEL": MODEL,
        "CHAT_READ_TIMEOUT": "2",
        "CHAT_CONNECT_TIMEOUT": "1",
        "MAX_HISTORY": str(MAX_HISTORY),
        "METRICS_TOKEN": METRICS_TOKEN,
        **extra,
    }


def budget_env(provider: FakeProvider, **extra: str) -> dict[str, str | None]:
    """chat_env with the per-account and per-anonymous daily budgets at BUDGET tokens."""
    return chat_env(
        provider,
        CHAT_DAILY_TOKENS_USER=str(BUDGET),
        CHAT_DAILY_TOKENS_ANON=str(BUDGET),
        **extra,
    )


@pytest.fixture(scope="module", params=SETUPS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, provider: FakeProvider
) -> Iterator[Server]:
    """A server per setup chatting with the fake, no budget, MAX_HISTORY=2."""
    yield from shared_server(request, tmp_path_factory, chat_env(provider))


@pytest.fixture(scope="module", params=SETUPS)
def budgets(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, provider: FakeProvider
) -> Iterator[Server]:
    """A server per setup with CHAT_DAILY_TOKENS_USER = CHAT_DAILY_TOKENS_ANON = 250 (no site
    budget): tests use their own accounts and their own client addresses."""
    yield from shared_server(request, tmp_path_factory, budget_env(provider))


# -- clients -----------------------------------------------------------------------------------

_addresses = itertools.count(1)


def new_address() -> str:
    """A client address no other test of this run uses (198.18.0.0/15, for benchmarks)."""
    n = next(_addresses)
    return f"198.18.{n // 250}.{n % 250 + 1}"


def visitor(server: Server, address: str | None = None) -> Client:
    """A new browser, from `address` (X-Forwarded-For, trusted from loopback) if given."""
    return server.client({"X-Forwarded-For": address} if address else None)


def say(server: Server, client: Client, message: str, text: str | None = None) -> Chat:
    """One complete round: 200, the expected text (the fake's echo by default), a done line."""
    answer = chat(server, client, message)
    assert answer.status == 200, answer
    assert answer.lines and answer.lines[-1].get("done") is True, answer.lines
    assert answer.text == (echo_text(message) if text is None else text), answer.lines
    return answer


def unique(prefix: str) -> str:
    """A message nobody else sends."""
    return f"{prefix}-{random_hex(3)}"


def history(client: Client) -> list[dict[str, str]]:
    """GET /chat/history: the messages (asserting the envelope)."""
    answer = client.get("/chat/history")
    assert answer.status == 200, answer
    assert answer.header("Cache-Control") == "no-store", answer.headers
    body = answer.json()
    assert body["ok"] is True and isinstance(body["messages"], list), body
    return body["messages"]


def rounds(*messages: str) -> list[dict[str, str]]:
    """The history of these rounds, each answered by the fake's echo."""
    out = []
    for message in messages:
        out += [
            {"role": "user", "content": message},
            {"role": "assistant", "content": echo_text(message)},
        ]
    return out


def chat_usage(client: Client) -> dict[str, Any]:
    """GET /chat/usage: its "today" object."""
    answer = client.get("/chat/usage")
    assert answer.status == 200, answer
    body = answer.json()
    assert body["ok"] is True, body
    return body["today"]


def foreign_visitor_id() -> str:
    """A cc_app in the server's format, fresh, signed with another server's key."""
    payload = f"{secrets.token_urlsafe(16)}.{int(time.time())}"
    mac = hmac.new(secrets.token_bytes(32), f"visitor\0{payload}".encode(), hashlib.sha256)
    signature = base64.urlsafe_b64encode(mac.digest()[:16]).rstrip(b"=").decode()
    return f"{payload}.{signature}"


# -- SQL and budgets ---------------------------------------------------------------------------


def sha(text: str) -> str:
    """sha256 hex."""
    return hashlib.sha256(text.encode()).hexdigest()


def today() -> str:
    """The UTC day, as chat_usage keeps it."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


def seconds_to_midnight() -> float:
    """Seconds until the next UTC day."""
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return (midnight - now).total_seconds()


def user_id(server: Server, email: str) -> int:
    """An account's id."""
    (row,) = sql_rows(server, "SELECT id FROM users WHERE email = %s", (email,))
    return int(row["id"])


def user_owner(server: Server, email: str) -> str:
    """chat_usage.owner of an account."""
    return f"user:{user_id(server, email)}"


def visitor_owner(client: Client) -> str:
    """chat_usage.owner of an anonymous visitor (by its cc_app)."""
    return f"visitor:{sha(client.cookies['cc_app'])[:32]}"


def usage_rows(server: Server, owner: str) -> list[dict[str, Any]]:
    """An owner's chat_usage rows."""
    return sql_rows(
        server,
        "SELECT day, owner, user_id, address, provider, model, requests, prompt_tokens,"
        " completion_tokens, estimated FROM chat_usage WHERE owner = %s"
        " ORDER BY day, provider, model",
        (owner,),
    )


def recorded(server: Server, owner: str, requests: int) -> list[dict[str, Any]]:
    """The owner's rows once they count `requests` answers (polled: a broken-off answer is
    recorded a moment after the visitor sees its end)."""
    return wait_until(
        lambda: (
            (rows := usage_rows(server, owner))
            and sum(int(r["requests"]) for r in rows) >= requests
            and rows
        ),
        RECORD_WAIT,
        what=f"{requests} answer(s) of {owner} in chat_usage",
    )


def one_row(server: Server, owner: str, requests: int) -> dict[str, Any]:
    """The owner's single usage row, once it counts `requests` answers (exactly)."""
    rows = recorded(server, owner, requests)
    assert len(rows) == 1, rows
    (row,) = rows
    assert int(row["requests"]) == requests, row
    assert row["day"] == today() and row["provider"] == "deepseek" and row["model"] == MODEL, row
    return row


def tokens(row: Mapping[str, Any]) -> tuple[int, int, int]:
    """(prompt, completion, estimated) of a usage row."""
    return int(row["prompt_tokens"]), int(row["completion_tokens"]), int(row["estimated"])


def est(characters: int) -> int:
    """The server's estimate: characters / 4, rounded up."""
    return math.ceil(characters / 4)


def assert_budget_refusal(answer: Chat) -> None:
    """429 chat_budget_exhausted with Retry-After = the seconds to the next UTC midnight."""
    assert answer.status == 429, answer
    body = answer.json()
    assert body.get("ok") is False and body.get("code") == "chat_budget_exhausted", body
    assert isinstance(body.get("error"), str) and body["error"].strip(), body
    retry = answer.header("Retry-After") or ""
    assert retry.isdigit(), answer.headers
    expected = seconds_to_midnight()
    assert abs(int(retry) - expected) <= 5, (
        f"Retry-After {retry}, next UTC midnight in {expected:.0f} s"
    )


def refused_without_asking(server: Server, fake: FakeProvider, client: Client, what: str) -> None:
    """The next chat is refused over a budget and the provider is not asked."""
    before = len(fake.requests)
    assert_budget_refusal(chat(server, client, unique(what)))
    assert len(fake.requests) == before, "the provider was asked for a refused chat"


# -- metrics -----------------------------------------------------------------------------------

SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")


def scrape(server: Server, headers: Mapping[str, str] | None = None) -> dict[str, float]:
    """GET /metrics from loopback: {'name{labels}': value}."""
    answer = server.client().get("/metrics", headers=headers)
    assert answer.status == 200, answer
    content_type = answer.header("Content-Type") or ""
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    samples = {}
    for line in answer.body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE_RE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[match.group(1)] = float(match.group(2))
    return samples


def refusals(server: Server, budget: str) -> float:
    """cloudchat_chat_budget_refusals_total{budget=...}."""
    return scrape(server).get(f'cloudchat_chat_budget_refusals_total{{budget="{budget}"}}', 0.0)


###############################################################################
# GET /chat/history
###############################################################################


def test_history_is_empty_for_a_new_visitor(server: Server) -> None:
    """A new browser, a made-up cc_app and one signed by another server: []."""
    assert history(server.client()) == []
    made_up = server.client()
    made_up.cookies["cc_app"] = "made-up-visitor-id"
    assert history(made_up) == []
    foreign = server.client()
    foreign.cookies["cc_app"] = foreign_visitor_id()
    assert history(foreign) == []


def test_history_of_an_anonymous_visitor(server: Server, fake: FakeProvider) -> None:
    """Two rounds: the 4 messages in order, for this cc_app only; others see []."""
    client = server.client()
    first, second = unique("first"), unique("second")
    say(server, client, first)
    assert "cc_app" in client.cookies
    say(server, client, second)
    assert history(client) == rounds(first, second)
    assert history(server.client()) == []
    tampered = server.client()
    value = client.cookies["cc_app"]
    tampered.cookies["cc_app"] = value[:-1] + ("A" if value[-1] != "A" else "B")
    assert history(tampered) == []
    foreign = server.client()
    foreign.cookies["cc_app"] = foreign_visitor_id()
    assert history(foreign) == []


def test_history_is_bounded_by_max_history(server: Server, fake: FakeProvider) -> None:
    """MAX_HISTORY=2: after three rounds only the last two; the next request carries those."""
    client = server.client()
    messages = [unique(f"round{n}") for n in range(1, 4)]
    for message in messages:
        say(server, client, message)
    assert history(client) == rounds(*messages[1:])
    say(server, client, "next")
    sent = [(m["role"], m["content"]) for m in fake.requests[-1].messages]
    expected = [("system", SYSTEM)]
    expected += [(m["role"], m["content"]) for m in rounds(*messages[1:])]
    assert sent == [*expected, ("user", "next")]


def test_history_of_an_account_on_two_browsers(server: Server, fake: FakeProvider) -> None:
    """Logged in: the account's history, the same in a second browser, not the anonymous
    one this browser had before logging in; after logout a fresh anonymous id: []."""
    email, password = random_email(), strong_password()
    browser = server.client()
    anonymous = unique("anon")
    say(server, browser, anonymous)
    anonymous_id = browser.cookies["cc_app"]
    assert browser.register(email, password).status == 201
    assert browser.login(email, password).status == 200
    mine = [unique("acct1"), unique("acct2")]
    for message in mine:
        say(server, browser, message)
    other = server.client()
    assert other.login(email, password).status == 200
    assert history(browser) == rounds(*mine)
    assert history(other) == rounds(*mine)
    # The anonymous history is still its own, apart from the account's.
    before = server.client()
    before.cookies["cc_app"] = anonymous_id
    assert history(before) == rounds(anonymous)
    assert browser.post("/auth/logout").status == 200
    assert history(browser) == []
    assert history(other) == rounds(*mine)


###############################################################################
# Usage accounting
###############################################################################


def test_reported_usage_is_recorded_exactly(server: Server, fake: FakeProvider) -> None:
    """A provider that reports usage: its numbers, summed in one row per day and model, for
    an account and for an anonymous visitor; GET /chat/usage counts them (limit null)."""
    client, email, _ = register_and_login(server)
    assert chat_usage(client) == {"tokens": 0, "limit": None}
    fake.script(Reply(usage=usage(61, 39)), Reply(usage=usage(7, 3)))
    say(server, client, unique("one"))
    say(server, client, unique("two"))
    uid = user_id(server, email)
    row = one_row(server, f"user:{uid}", 2)
    assert tokens(row) == (68, 42, 0), row
    assert int(row["user_id"]) == uid and row["address"] == "127.0.0.1", row
    assert chat_usage(client) == {"tokens": 110, "limit": None}

    anonymous = visitor(server)
    assert chat_usage(anonymous) == {"tokens": 0, "limit": None}
    fake.script(Reply(usage=usage(20, 5)))
    say(server, anonymous, unique("anon"))
    row = one_row(server, visitor_owner(anonymous), 1)
    assert tokens(row) == (20, 5, 0) and row["user_id"] is None, row
    assert chat_usage(anonymous) == {"tokens": 25, "limit": None}


def test_unreported_usage_is_estimated(server: Server, fake: FakeProvider) -> None:
    """No usage report: ceil(chars/4) of system prompt + history + message, and of the
    relayed reply (reasoning included), marked estimated."""
    client = visitor(server)
    first, second = unique("first é"), unique("second 你好")
    reply1, reply2 = ["Hello", " there é🙂"], ["ok", "!"]
    reasoning2 = ["think", "ing"]
    fake.script(
        Reply(deltas=reply1, usage=None), Reply(deltas=reply2, reasoning=reasoning2, usage=None)
    )
    say(server, client, first, "".join(reply1))
    say(server, client, second, "".join(reply2))
    prompt1 = len(SYSTEM) + len(first)
    prompt2 = len(SYSTEM) + len(first) + len("".join(reply1)) + len(second)
    completion1 = len("".join(reply1))
    completion2 = len("".join(reply2)) + len("".join(reasoning2))
    row = one_row(server, visitor_owner(client), 2)
    expected = (est(prompt1) + est(prompt2), est(completion1) + est(completion2), 2)
    assert tokens(row) == expected, (
        row,
        f"prompt chars {prompt1}, {prompt2}; reply {completion1}, {completion2}",
    )
    assert chat_usage(client) == {"tokens": expected[0] + expected[1], "limit": None}


def test_answer_broken_off_by_the_provider_is_recorded(server: Server, fake: FakeProvider) -> None:
    """The provider resets after two tokens: the visitor gets an error line, the answer
    is still counted (estimated: the prompt and the characters relayed)."""
    client = visitor(server)
    message = unique("broken")
    fake.script(Reply(deltas=["par", "tial", " never"], mode="reset", fail_after=2))
    answer = chat(server, client, message)
    assert answer.status == 200 and "error" in answer.lines[-1], answer.lines
    assert answer.text == "partial"
    row = one_row(server, visitor_owner(client), 1)
    assert tokens(row) == (est(len(SYSTEM) + len(message)), est(len("partial")), 1), row


def test_answer_the_visitor_hangs_up_on_is_recorded(server: Server, fake: FakeProvider) -> None:
    """The visitor hangs up mid-stream: the answer is counted all the same."""
    client = visitor(server)
    message = unique("leaving")
    fake.script(Reply(deltas=["tok "] * 200, delay=0.05))
    stream = ChatStream(server, client, message)
    assert stream.response.status == 200
    assert stream.next_text() == "tok "
    stream.close()
    row = one_row(server, visitor_owner(client), 1)
    prompt, completion, estimated = tokens(row)
    assert (prompt, estimated) == (est(len(SYSTEM) + len(message)), 1), row
    assert 1 <= completion < est(800), row


###############################################################################
# Daily budgets
###############################################################################


@pytest.mark.parametrize("setup", SETUPS)
def test_site_budget(make_server: ServerFactory, fake: FakeProvider, setup: str) -> None:
    """CHAT_DAILY_TOKENS=250, 125 tokens an answer: after two answers (250 >= 250) the
    next chat from anyone, account or visitor, is refused before the provider is asked."""
    srv = make_server.start(setup, chat_env(fake, CHAT_DAILY_TOKENS="250"))
    fake.always(budget_reply(125))
    say(srv, visitor(srv, new_address()), unique("one"))
    account, _, _ = register_and_login(srv)
    say(srv, account, unique("two"))
    assert len(fake.requests) == 2
    refused_without_asking(srv, fake, visitor(srv, new_address()), "third")
    refused_without_asking(srv, fake, account, "again")
    assert refusals(srv, "site") == 2
    assert chat_usage(account) == {"tokens": 125, "limit": None}


def test_account_budget(budgets: Server, fake: FakeProvider) -> None:
    """CHAT_DAILY_TOKENS_USER=250, 100 an answer: the third answer crosses it (it was asked
    at 200), the fourth is refused; another account and anonymous visitors still chat."""
    fake.always(budget_reply())
    spender, _, _ = register_and_login(budgets)
    before = refusals(budgets, "owner")
    for n in range(3):
        say(budgets, spender, unique(f"spend{n}"))
    assert chat_usage(spender) == {"tokens": 300, "limit": BUDGET}
    refused_without_asking(budgets, fake, spender, "over")
    assert refusals(budgets, "owner") == before + 1
    other, _, _ = register_and_login(budgets)
    say(budgets, other, unique("other account"))
    assert chat_usage(other) == {"tokens": PER_ANSWER, "limit": BUDGET}
    anonymous = visitor(budgets, new_address())
    say(budgets, anonymous, unique("anonymous"))
    assert chat_usage(anonymous) == {"tokens": PER_ANSWER, "limit": BUDGET}


def test_account_budget_holds_on_every_device(budgets: Server, fake: FakeProvider) -> None:
    """The account's budget is the account's: spent in one browser, refused in another."""
    fake.always(budget_reply(BUDGET))
    email, password = random_email(), strong_password()
    first = budgets.client()
    assert first.register(email, password).status == 201
    assert first.login(email, password).status == 200
    say(budgets, first, unique("all of it"))
    second = budgets.client()
    assert second.login(email, password).status == 200
    refused_without_asking(budgets, fake, second, "second device")


def test_anonymous_budget_per_visitor_and_per_address(budgets: Server, fake: FakeProvider) -> None:
    """CHAT_DAILY_TOKENS_ANON=250: one visitor is refused after crossing it; a visitor from
    another address still chats; visitors of one address together hit the address's
    budget; accounts count neither against the visitor nor the address budget."""
    fake.always(budget_reply())
    before = {kind: refusals(budgets, kind) for kind in ("owner", "ip")}
    address = new_address()
    spender = visitor(budgets, address)
    for n in range(3):
        say(budgets, spender, unique(f"spend{n}"))
    assert chat_usage(spender) == {"tokens": 300, "limit": BUDGET}
    refused_without_asking(budgets, fake, spender, "over")

    elsewhere = visitor(budgets, new_address())
    say(budgets, elsewhere, unique("elsewhere"))

    shared = new_address()
    one, two, three = (visitor(budgets, shared) for _ in range(3))
    say(budgets, one, unique("one-a"))
    say(budgets, one, unique("one-b"))
    say(budgets, two, unique("two-a"))  # the address is at 200 < 250: goes through
    assert chat_usage(two) == {"tokens": PER_ANSWER, "limit": BUDGET}
    refused_without_asking(budgets, fake, three, "three")  # a new visitor, the address's 300
    refused_without_asking(budgets, fake, two, "two-b")
    after = {kind: refusals(budgets, kind) for kind in ("owner", "ip")}
    assert after["ip"] >= before["ip"] + 2, (before, after)

    # An account from the spent address chats; its answers do not count for the address.
    account, _, _ = register_and_login(budgets)
    account.headers["X-Forwarded-For"] = shared
    say(budgets, account, unique("account at a spent address"))
    fresh = new_address()
    account.headers["X-Forwarded-For"] = fresh
    say(budgets, account, unique("account 1"))
    say(budgets, account, unique("account 2"))
    neighbour = visitor(budgets, fresh)
    for n in range(3):  # 0, 100, 200 < 250: the account's 300 tokens are not the address's
        say(budgets, neighbour, unique(f"neighbour{n}"))
    refused_without_asking(budgets, fake, visitor(budgets, fresh), "fresh neighbour")


def test_budget_rebuilt_from_sql_after_redis_loss(
    make_server: ServerFactory, redis_db: RedisDb, fake: FakeProvider
) -> None:
    """PostgreSQL + Redis: the budget counters (names as specified) are deleted, ready key
    included; the next check rebuilds them from chat_usage and the limits hold at the same
    point as without the loss."""
    srv = make_server.start("postgres", budget_env(fake))
    prefix = srv.env["REDIS_KEY_PREFIX"]
    fake.always(budget_reply())
    account, email, _ = register_and_login(srv)
    address = new_address()
    anonymous = visitor(srv, address)
    for n in range(2):
        say(srv, account, unique(f"account{n}"))
        say(srv, anonymous, unique(f"anonymous{n}"))
    day = today()
    client = redis_db.client
    expected = {
        f"budget:{day}:site:all": b"400",
        f"budget:{day}:owner:{sha(user_owner(srv, email))[:32]}": b"200",
        f"budget:{day}:owner:{sha(visitor_owner(anonymous))[:32]}": b"200",
        f"budget:{day}:ip:{sha(address)[:32]}": b"200",
    }
    for key, value in expected.items():
        assert client.get(prefix + key) == value, (key, client.keys(prefix + "budget:*"))
    assert client.exists(prefix + f"budget:{day}:ready"), client.keys(prefix + "budget:*")
    keys = client.keys(prefix + "budget:*")
    assert client.delete(*keys) == len(keys)

    say(srv, account, unique("account, rebuilt at 200"))
    assert client.exists(prefix + f"budget:{day}:ready"), "the ready key was not set again"
    refused_without_asking(srv, fake, account, "account over")
    say(srv, anonymous, unique("anonymous, rebuilt at 200"))
    refused_without_asking(srv, fake, anonymous, "anonymous over")
    refused_without_asking(srv, fake, visitor(srv, address), "same address over")
    assert client.get(prefix + f"budget:{day}:site:all") == b"600"


def test_budget_survives_a_restart_embedded(make_server: ServerFactory, fake: FakeProvider) -> None:
    """Embedded: a server restarted on the same SQLite file (its counters were in the old
    process's memory) still enforces the day's budgets where they stood."""
    first = make_server.start("embedded", budget_env(fake))
    fake.always(budget_reply())
    account, _, _ = register_and_login(first)
    address = new_address()
    anonymous = visitor(first, address)
    for n in range(2):
        say(first, account, unique(f"account{n}"))
        say(first, anonymous, unique(f"anonymous{n}"))
    first.stop()
    again = make_server.launch("embedded", first.env, first.workdir)
    for old in (account, anonymous):
        old.port = again.port
    assert chat_usage(account) == {"tokens": 200, "limit": BUDGET}
    assert chat_usage(anonymous) == {"tokens": 200, "limit": BUDGET}
    say(again, account, unique("account at 200"))
    refused_without_asking(again, fake, account, "account over")
    say(again, anonymous, unique("anonymous at 200"))
    refused_without_asking(again, fake, anonymous, "anonymous over")


def test_overshoot_is_bounded_by_the_answers_in_flight(budgets: Server, fake: FakeProvider) -> None:
    """N slow chats at once for one account with 250 tokens a day: each is checked before
    any has finished, so all may go through; the recorded total exceeds the limit by at
    most N-1 answers, every answer is counted, and afterwards the next chat is refused."""
    n = 5
    fake.always(budget_reply(deltas=["slow", " answer", " here"], delay=0.1))
    account, email, _ = register_and_login(budgets)

    def one(index: int) -> Chat:
        return chat(budgets, account, f"concurrent {index}")

    with ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(one, range(n)))
    statuses = [a.status for a in answers]
    assert set(statuses) <= {200, 429}, answers
    answered = statuses.count(200)
    rows = recorded(budgets, user_owner(budgets, email), answered)
    total = sum(int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in rows)
    overshoot = total - BUDGET
    note = (
        f"measured overshoot {overshoot} tokens over the {BUDGET}-token limit:"
        f" {answered} of {n} concurrent chats answered, {total} tokens recorded"
    )
    print(note)
    assert sum(int(r["requests"]) for r in rows) == answered, (note, rows)
    assert total == answered * PER_ANSWER, note
    assert overshoot <= (n - 1) * PER_ANSWER, note
    assert len(fake.requests) == answered, note
    refused_without_asking(budgets, fake, account, "after the burst")


###############################################################################
# The usage command
###############################################################################


def run_usage(server: Server, *args: str) -> tuple[list[str], str]:
    """`cloudchat.py usage ARGS` against the server's storage: (stdout lines, stderr)."""
    done = run_cli(["usage", *args], server.env, server.workdir)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout.splitlines(), done.stderr


def test_usage_command(server: Server, fake: FakeProvider) -> None:
    """--by user (email, anonymous), --by model, --by day, --json, and --days leaving out an
    older row."""
    account, email, _ = register_and_login(server)
    fake.script(Reply(usage=usage(70, 30)), Reply(usage=usage(20, 10)), Reply(usage=None))
    say(server, account, unique("one"))
    say(server, account, unique("two"))
    anonymous = visitor(server)
    message = unique("anonymous")
    say(server, anonymous, message)
    uid = user_id(server, email)
    one_row(server, f"user:{uid}", 2)
    anon_row = one_row(server, visitor_owner(anonymous), 1)
    anon_tokens = int(anon_row["prompt_tokens"]) + int(anon_row["completion_tokens"])
    old_day = (dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).strftime("%Y-%m-%d")
    sql_rows(
        server,
        "INSERT INTO chat_usage (day, owner, user_id, address, provider, model, requests,"
        " prompt_tokens, completion_tokens, estimated) VALUES (%s, %s, %s, %s, %s, %s, 1, 1000,"
        " 1, 0)",
        (old_day, f"user:{uid}", uid, "127.0.0.1", "deepseek", "old-model"),
    )
    yesterday = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).strftime("%Y-%m-%d")

    lines, err = run_usage(server, "--by", "user", "--days", "2")
    assert f"{email}\t2 answers\t130 tokens" in lines, lines
    anon_name = f"anonymous {visitor_owner(anonymous)[8:16]}"
    assert f"{anon_name}\t1 answers\t{anon_tokens} tokens  (1 estimated)" in lines, lines
    assert f"since {yesterday} (UTC)" in err, err

    lines, _ = run_usage(server, "--by", "user", "--json")
    records = [json.loads(line) for line in lines]
    mine = [r for r in records if r.get("user") == email]
    assert mine == [
        {
            "user": email,
            "requests": 3,
            "prompt_tokens": 1090,
            "completion_tokens": 41,
            "estimated": 0,
        }
    ], records

    lines, _ = run_usage(server, "--by", "model")
    models = {line.split("\t")[0]: line for line in lines}
    assert f"deepseek {MODEL}" in models, lines
    assert re.fullmatch(
        rf"deepseek {MODEL}\t\d+ answers\t\d+ tokens(  \(\d+ estimated\))?",
        models[f"deepseek {MODEL}"],
    )
    assert models.get("deepseek old-model") == "deepseek old-model\t1 answers\t1001 tokens", lines

    lines, _ = run_usage(server, "--by", "day", "--days", "2")
    days = [line.split("\t")[0] for line in lines]
    assert today() in days and old_day not in days, lines
    lines, _ = run_usage(server, "--by", "day", "--days", "7", "--json")
    days = [json.loads(line)["day"] for line in lines]
    assert today() in days and old_day in days, lines


###############################################################################
# /metrics and /livez
###############################################################################


def test_metrics_from_loopback(server: Server, fake: FakeProvider) -> None:
    """From loopback without X-Forwarded-For: requests by route, the latency histogram,
    tokens, logins, rate-limit refusals and the open-streams gauge."""
    start = scrape(server)
    history(server.client())
    assert server.client().get("/no-such-page").status == 404
    fake.script(Reply(usage=usage(11, 5)))
    say(server, server.client(), unique("metrics"))
    _, email, password = register_and_login(server)
    again = server.client().register(email, password)
    assert_error(again, 429, "rate_limited")  # RATE_REGISTER_EMAIL=1/3600
    now = scrape(server)

    def grew(sample: str, by: float = 1) -> None:
        assert now.get(sample, 0) - start.get(sample, 0) == by, (
            sample,
            start.get(sample),
            now.get(sample),
        )

    grew('cloudchat_requests_total{route="/chat/history",status="200"}')
    grew('cloudchat_requests_total{route="other",status="404"}')
    grew('cloudchat_chat_tokens_total{provider="deepseek",kind="prompt"}', 11)
    grew('cloudchat_chat_tokens_total{provider="deepseek",kind="completion"}', 5)
    grew('cloudchat_auth_events_total{event="login_ok"}')
    grew('cloudchat_rate_limited_total{action="register_email"}')
    assert now["cloudchat_chat_streams_open"] == 0, now
    buckets = [k for k in now if k.startswith("cloudchat_request_seconds_bucket{le=")]
    assert 'cloudchat_request_seconds_bucket{le="+Inf"}' in buckets, buckets
    assert len(buckets) >= 2, buckets
    assert (
        now['cloudchat_request_seconds_bucket{le="+Inf"}'] == now["cloudchat_request_seconds_count"]
    )
    assert now["cloudchat_request_seconds_count"] > start["cloudchat_request_seconds_count"]
    assert now["cloudchat_request_seconds_sum"] > 0
    values = [now[k] for k in buckets]
    assert values == sorted(values), buckets  # cumulative


def test_metrics_hidden_from_forwarded_requests(server: Server) -> None:
    """A request forwarded from loopback gets the unknown-path 404 (byte for byte); the
    right METRICS_TOKEN opens it even then, a wrong one does not."""
    unknown = server.client().get("/no-such-page")
    assert unknown.status == 404 and unknown.json() == NOT_FOUND, unknown
    for headers in (
        {"X-Forwarded-For": "203.0.113.9"},
        {"X-Real-IP": "203.0.113.9"},
        {"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {METRICS_TOKEN}x"},
        {"X-Forwarded-For": "203.0.113.9", "Authorization": "Bearer wrong"},
        {"X-Forwarded-For": "203.0.113.9", "Authorization": METRICS_TOKEN},
    ):
        hidden = server.client().get("/metrics", headers=headers)
        assert hidden.status == 404, (headers, hidden)
        assert hidden.body == unknown.body, (headers, hidden)
        assert hidden.header("Content-Type") == unknown.header("Content-Type"), headers
    opened = scrape(
        server, {"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert "cloudchat_request_seconds_count" in opened


def test_metrics_and_livez_under_concurrent_scrapes_and_junk_tokens(server: Server) -> None:
    """20 scrapes and 20 liveness probes at once all answer whole; a huge, binary or empty
    bearer from a forwarded client is the plain 404 every time, and no token reaches the
    log. (Neither page has a rate limit: a scraper or a probe must never be refused, and a
    40-character token is not guessed by trying.)"""
    forwarded = {"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {METRICS_TOKEN}"}

    def scrape_once(_: int) -> bool:
        return "cloudchat_request_seconds_count" in scrape(server, forwarded)

    def live_once(_: int) -> int:
        return server.client().get("/livez").status

    with ThreadPoolExecutor(max_workers=20) as pool:
        scrapes = list(pool.map(scrape_once, range(20)))
        lives = list(pool.map(live_once, range(20)))
    assert all(scrapes) and lives == [200] * 20, (scrapes, lives)
    for junk in (
        "Bearer " + "x" * 6000,
        "Bearer \u00ff\u00fe",
        "Bearer ",
        "",
        "Basic Zm9vOmJhcg==",
    ):
        hidden = server.client().get(
            "/metrics", headers={"X-Forwarded-For": "203.0.113.9", "Authorization": junk}
        )
        assert hidden.status in (404, 431), (junk[:20], hidden)
    assert METRICS_TOKEN not in server.log_text()


def test_nginx_answers_metrics_with_404_and_passes_livez(make_server: ServerFactory) -> None:
    """The shipped location block: /cloudchat/metrics is nginx's own 404 (the app never
    sees it), /cloudchat/livez reaches the app."""
    binary = find_binary("nginx")
    if binary is None:
        unavailable("nginx is not installed (apt-get install nginx); this test needs it")
    assert binary is not None
    app = make_server.start("embedded")
    nginx = Nginx(binary, [app.port]).start()
    try:
        front = Client("127.0.0.1", nginx.port)
        hidden = front.get("/cloudchat/metrics")
        assert hidden.status == 404, hidden
        assert json.loads(hidden.body) == NOT_FOUND, hidden
        live = front.get("/cloudchat/livez")
        assert live.status == 200 and live.json() == {"ok": True}, live
        wait_until(lambda: "GET /livez 200" in app.log_text(), 5, what="the app's /livez line")
        assert "/metrics" not in app.log_text(), app.log_text()
    finally:
        nginx.stop()


def test_livez(server: Server) -> None:
    """GET /livez: 200 {"ok": true}."""
    answer = server.client().get("/livez")
    assert answer.status == 200 and answer.json() == {"ok": True}, answer


def test_livez_without_storage(make_server: ServerFactory) -> None:
    """Database and Redis both unreachable (closed ports): /livez is still 200 while the
    readiness check says 503."""
    srv = make_server.start(
        "embedded",
        {
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere",
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "DB_TIMEOUT": "1",
            "REDIS_TIMEOUT": "1",
        },
    )
    client = srv.client()
    live = client.get("/livez")
    assert live.status == 200 and live.json() == {"ok": True}, live
    assert live.elapsed < 1.0, live.elapsed
    ready = client.get("/auth/healthz")
    assert ready.status == 503, ready


###############################################################################
# LOG_FORMAT=json
###############################################################################


def test_json_logs(make_server: ServerFactory, fake: FakeProvider) -> None:
    """Every line a JSON object; a request's line has its X-Request-ID, method, path,
    status (an int) and ms; no password, cookie or key sent appears in any line."""
    srv = make_server.start("embedded", chat_env(fake, LOG_FORMAT="json"))
    email, password, wrong = random_email(), strong_password(), strong_password()
    client = srv.client()
    assert client.register(email, password).status == 201
    assert client.login(email, "x" + wrong).status == 401
    assert client.login(email, password).status == 200
    say(srv, client, unique("logged in"))
    anonymous = srv.client()
    say(srv, anonymous, unique("anonymous"))
    say(srv, anonymous, unique("again"))
    rid = str(uuid.uuid4())
    me = client.get("/auth/me", headers={"X-Request-ID": rid})
    assert me.status == 200 and me.header("X-Request-ID") == rid, me.headers
    history_rid = str(uuid.uuid4())
    assert client.get("/chat/history", headers={"X-Request-ID": history_rid}).status == 200
    missing = srv.client().get("/nope", headers={"X-Request-ID": "not-a-uuid"})
    assert missing.status == 404
    sent_secrets = {
        "password": password,
        "wrong password": "x" + wrong,
        "api key": KEY,
        "metrics token": METRICS_TOKEN,
        **{f"cookie {k}": v for k, v in client.cookies.items()},
        **{f"anonymous cookie {k}": v for k, v in anonymous.cookies.items()},
    }
    assert {"cookie cc_auth", "anonymous cookie cc_app"} <= set(sent_secrets), sent_secrets
    wait_until(lambda: history_rid in srv.log_text(), REQUEST_TIMEOUT, what="the history line")
    srv.stop()  # every line written and read

    entries = []
    for line in srv.logs:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"a log line that is not JSON: {line!r}")
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= set(entry), line
        for what, secret in sent_secrets.items():
            assert secret not in line, f"{what} in the log: {line}"
        entries.append(entry)
    by_rid = {e["request_id"]: e for e in entries if "request_id" in e}
    assert by_rid.get(rid), entries
    line = by_rid[rid]
    assert (line["method"], line["path"], line["status"]) == ("GET", "/auth/me", 200), line
    assert isinstance(line["ms"], (int, float)) and line["ms"] >= 0, line
    assert by_rid[history_rid]["path"] == "/chat/history", by_rid[history_rid]
    not_found = [e for e in entries if e.get("path") == "/nope"]
    assert len(not_found) == 1 and not_found[0]["status"] == 404, not_found
    assert str(uuid.UUID(not_found[0]["request_id"])) == not_found[0]["request_id"]
    chats = [e for e in entries if e.get("path") == CHAT]
    assert len(chats) == 3 and all(e["status"] == 200 for e in chats), chats
    assert any("listening on" in e["message"] for e in entries)


@pytest.mark.parametrize("setup", SETUPS)
def test_history_and_usage_reads_have_their_own_address_limit(
    make_server: ServerFactory, setup: str
) -> None:
    """GET /chat/history and /chat/usage count together per address (RATE_CHAT_IP's rule,
    their own counter): past it 429 with Retry-After, while chatting is not charged and
    another address still reads; hostile cookies and 8 readers at once get clean answers."""
    srv = make_server.start(setup, {"RATE_CHAT_IP": "6/60"})
    mine = srv.client({"X-Forwarded-For": "198.51.100.7"})
    assert mine.post(CHAT, {"message": "hello"}).status == 200
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: mine.get("/chat/history"), range(4)))
    assert [a.status for a in answers] == [200] * 4, answers
    assert all(a.json() == answers[0].json() for a in answers), answers
    assert len(answers[0].json()["messages"]) == 2, answers[0].json()
    assert mine.get("/chat/usage").status == 200  # the 5th read of the address
    assert mine.get("/chat/history").status == 200  # the 6th, the last one allowed
    refused = mine.get("/chat/history")
    assert refused.status == 429 and refused.json()["code"] == "rate_limited", refused
    assert int(refused.header("Retry-After") or 0) > 0, refused.headers
    assert mine.get("/chat/usage").status == 429
    other = srv.client({"X-Forwarded-For": "198.51.100.8"})
    other.cookies["cc_app"] = "x" * 5000
    empty = other.get("/chat/history")
    assert empty.status == 200 and empty.json() == {"ok": True, "messages": []}, empty
    other.cookies["cc_app"] = "not-one-of-ours.\x7f"
    assert other.get("/chat/usage").json()["today"]["tokens"] == 0
