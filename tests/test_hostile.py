"""Hostile peers: slow and idle clients, an SMTP relay that hangs or hangs up, a slow or broken
model provider. The server keeps serving everyone else and cleans up after the attackers.

Leaks are read from the server's own `stats` line (SIGUSR1: connections, greenlets, open
file descriptors, RSS).
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import SETUPS, ServerFactory
from tests.fakeprovider import FakeProvider, Reply, echo_text
from tests.helpers import (
    HIGH_LIMITS,
    Server,
    SilentTcpServer,
    assert_error,
    logged,
    random_email,
    strong_password,
    wait_until,
)
from tests.hostile_net import ClosingTcpServer, TrickleAttack, server_stats
from tests.test_chat import (
    READ_TIMEOUT,
    ChatStream,
    assert_failed_mid_stream,
    assert_streamed,
    chat,
    chat_env,
    history,
    say,
    turns,
)

KIB_PER_MIB = 1024


def registered(server: Server) -> tuple[str, str]:
    """A fresh account: (email, password)."""
    email, password = random_email(), strong_password()
    assert server.client().register(email, password).status == 201
    return email, password


def assert_served(server: Server, email: str, password: str) -> tuple[float, float]:
    """GET /test and a login both answer; their latencies, printed for the record (how fast
    under attack is bench/soak.py's slow-headers figure, not an assertion)."""
    test = server.client().get("/test", timeout=10)
    assert test.status == 200, test
    login = server.client().login(email, password)
    assert login.status == 200, login
    return test.elapsed, login.elapsed


def settled(server: Server, baseline: dict[str, int]) -> dict[str, int]:
    """Wait until no client connection is open and the greenlets are back at the baseline."""

    def calm() -> dict[str, int] | None:
        now = server_stats(server)
        quiet = now["connections"] == 0 and now["greenlets"] <= baseline["greenlets"]
        return now if quiet else None

    return wait_until(calm, 10, interval=0.2, what=f"connections 0, greenlets <= {baseline}")


# -- slow and idle clients --------------------------------------------------------------------

SLOW_TIMEOUT = 2  # HEADER_TIMEOUT and BODY_TIMEOUT of the attacked server
ATTACKERS = 50


def test_slow_headers_and_slow_bodies_do_not_starve_others(make_server: ServerFactory) -> None:
    """125 trickling clients: others are served at once; the attackers are cut off."""
    server = make_server.start(
        "embedded",
        {
            **HIGH_LIMITS,
            "HEADER_TIMEOUT": str(SLOW_TIMEOUT),
            "BODY_TIMEOUT": str(SLOW_TIMEOUT),
            "CLIENT_TIMEOUT": "30",
        },
    )
    email, password = registered(server)
    baseline = server_stats(server)
    attack = TrickleAttack(server.port, interval=0.1)
    try:
        # Request line and headers a byte at a time, never the blank line that ends them.
        slow_headers = attack.open(
            ATTACKERS, b"", b"GET /test HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 5000
        )
        # Headers at once, then a body of 1000 declared bytes, a byte at a time.
        slow_bodies = attack.open(
            ATTACKERS,
            b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n",
            b'{"identifier": "' + b"a" * 990,
        )
        # The same with a chunked body: no length declared, chunks trickling in.
        slow_chunks = attack.open(
            ATTACKERS // 2,
            b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"".join(b"1\r\n%c\r\n" % c for c in b'{"identifier": "' + b"a" * 400),
        )
        attack.start()
        everyone = len(attack.clients)
        during = wait_until(
            lambda: (s := server_stats(server))["connections"] >= everyone and s,
            5,
            what="the server to hold every attacker",
        )
        latencies = [assert_served(server, email, password)]
        # Served while the server still held every attacker, not after it cut them off.
        assert not [c for c in attack.clients if c.closed_at is not None], "attackers cut first"
        latencies += [assert_served(server, email, password) for _ in range(2)]
        print(f"during the attack: {during}; /test and login latencies: {latencies}")

        wait_until(
            lambda: attack.all_closed(attack.clients),
            SLOW_TIMEOUT + 5,
            what="the server to cut off every slow client",
        )
        # Cut off by HEADER_TIMEOUT and BODY_TIMEOUT (CLIENT_TIMEOUT is 30 s): the 400s are
        # logged with their cause, the 408s say request_timeout.
        logged(server, f"request headers took longer than {SLOW_TIMEOUT} s", ATTACKERS)
        for client in slow_headers:
            assert client.closed_at is not None
            assert client.answer.startswith(b"HTTP/1.1 400"), client.answer[:200]
        for client in slow_bodies + slow_chunks:
            assert client.closed_at is not None
            assert client.answer.startswith(b"HTTP/1.1 408"), client.answer[:200]
            assert b'"code":"request_timeout"' in client.answer, client.answer[:300]
    finally:
        attack.stop()
    after = settled(server, baseline)
    print(f"stats before {baseline}, after {after}")
    assert after["open_fds"] <= baseline["open_fds"] + 2, (baseline, after)
    assert_served(server, email, password)


IDLE = 1000
FD_NEEDED = 2500


@pytest.fixture
def fd_room() -> Iterator[None]:
    """Room for IDLE sockets here and in the server: raise the soft limit if it is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FD_NEEDED and (hard == resource.RLIM_INFINITY or hard >= FD_NEEDED):
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_NEEDED, hard))
    try:
        now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if now < FD_NEEDED:
            pytest.skip(
                f"the open-file limit is {now} (hard {hard}); {IDLE} idle connections need"
                f" {FD_NEEDED}: raise it with `ulimit -n {FD_NEEDED}`"
            )
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_idle_connections(make_server: ServerFactory, fd_room: None) -> None:
    """1000 silent or half-begun connections: the server serves others, memory stays sane."""
    server = make_server.start(
        "embedded", {**HIGH_LIMITS, "HEADER_TIMEOUT": "60", "CLIENT_TIMEOUT": "60"}
    )
    email, password = registered(server)
    before = server_stats(server)
    idle: list[socket.socket] = []
    try:
        for n in range(IDLE):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if n % 2:
                sock.sendall(b"GET /te")  # a request line begun, never finished
            idle.append(sock)
        held = wait_until(
            lambda: (s := server_stats(server))["connections"] >= IDLE and s,
            10,
            what=f"the server to hold {IDLE} connections",
        )
        latencies = [assert_served(server, email, password) for _ in range(3)]
        with_idle = server_stats(server)
        assert with_idle["connections"] >= IDLE, with_idle  # served while all were held
    finally:
        for sock in idle:
            sock.close()
    after = settled(server, before)
    print(
        f"{IDLE} idle connections: rss_kib before={before['rss_kib']} with={with_idle['rss_kib']}"
        f" after={after['rss_kib']}; open_fds before={before['open_fds']}"
        f" with={held['open_fds']} after={after['open_fds']}; latencies {latencies}"
    )
    assert with_idle["rss_kib"] < 300 * KIB_PER_MIB, with_idle
    assert after["open_fds"] <= before["open_fds"] + 2, (before, after)


# -- mail relay that hangs or hangs up --------------------------------------------------------

SMTP_TIMEOUT = 1
MAIL_RETRIES = 1
RETRY_DELAY = 1.0  # cloudchat.Mailer.RETRY_DELAYS[0], between the two attempts


@pytest.mark.parametrize("relay_kind", ["never-greets", "hangs-up"])
def test_smtp_relay_that_hangs_or_hangs_up(make_server: ServerFactory, relay_kind: str) -> None:
    """A relay that never greets or hangs up: answers stay prompt, failures logged in time."""
    relay = SilentTcpServer() if relay_kind == "never-greets" else ClosingTcpServer()
    try:
        server = make_server.start(
            "embedded",
            {
                **HIGH_LIMITS,
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(relay.port),
                "SMTP_TLS": "0",
                "SMTP_TIMEOUT": str(SMTP_TIMEOUT),
                "MAIL_RETRIES": str(MAIL_RETRIES),
                "DEBUG_RETURN_RESET_TOKEN": "1",
            },
        )
        baseline = server_stats(server)
        email, password = random_email(), strong_password()
        attempts = MAIL_RETRIES + 1
        failed = f"failed after {attempts} attempt(s)"

        def mail_failed(kind: str) -> bool:
            """The failure of the mail of this kind is in the log."""
            return any(f"mail {kind} to" in line and failed in line for line in server.logs)

        # Each answer comes before its mail has failed: nobody waits for the relay.
        registration = server.client().register(email, password)
        assert registration.status == 201 and not mail_failed("welcome"), registration
        forgot = server.client().post("/auth/password/forgot", {"identifier": email})
        assert forgot.status == 200 and not mail_failed("reset"), forgot
        token = forgot.json()["debug_token"]

        budget = SMTP_TIMEOUT * attempts + RETRY_DELAY * MAIL_RETRIES + 2.0
        wait_until(
            lambda: mail_failed("welcome") and mail_failed("reset"),
            budget + 5,
            what="both mail failures in the log",
        )
        log = server.log_text()
        assert token not in log and "token=" not in log and password not in log
        assert len(relay.accepted) >= 2 * attempts, relay.accepted
        after = settled(server, baseline)
        assert after["open_fds"] <= baseline["open_fds"] + 1, (baseline, after)
    finally:
        relay.close()


# -- model provider that is slow or breaks ----------------------------------------------------


def test_slow_provider_streams_to_the_end(make_server: ServerFactory, fake: FakeProvider) -> None:
    """A token every 0.3 s for 3 s with CHAT_READ_TIMEOUT=1: the timeout is per read."""
    server = make_server.start("embedded", chat_env(fake))
    client = server.client()
    deltas = [f"t{n} " for n in range(10)]
    pause = 0.3
    # The provider sends a delta every `pause` s on a fixed schedule: slower in all than the
    # read timeout, never that slow between two reads.
    assert len(deltas) * pause > 2 * READ_TIMEOUT and pause < READ_TIMEOUT
    fake.script(Reply(deltas=deltas, delay=pause))
    with ChatStream(server, client, "slowly") as stream:
        assert stream.status == 200
        for expected in deltas:
            assert stream.next_text() == expected
        result = stream.finish()
    assert_streamed(result, "".join(deltas))
    logged(server, "POST /deepseek_chat 200")
    assert "chat failed" not in server.log_text()
    say(server, client, "next")
    assert turns(fake.requests[-1]) == [
        ("system", "You are a helpful assistant."),
        ("user", "slowly"),
        ("assistant", "".join(deltas)),
        ("user", "next"),
    ]


@pytest.mark.parametrize("setup", SETUPS)
def test_provider_faults_leave_history_intact(
    make_server: ServerFactory, fake: FakeProvider, setup: str
) -> None:
    """Mid-stream reset, invalid JSON, a reset before any token: only good rounds are kept."""
    server = make_server.start(setup, chat_env(fake))
    client = server.client()
    say(server, client, "good-1")
    say(server, client, "good-2")
    fake.script(Reply(deltas=["par", "tial", " lost"], mode="reset", fail_after=2))
    assert_failed_mid_stream(chat(server, client, "broken-reset"), "partial")
    fake.script(Reply(deltas=["half", " of", " it"], mode="invalid_json", fail_after=1))
    assert_failed_mid_stream(chat(server, client, "broken-json"), "half")
    fake.script(Reply(mode="reset", fail_after=0))
    assert_error(chat(server, client, "broken-early").response, 502, "provider_error")
    say(server, client, "good-3")
    requests = fake.requests
    assert len(requests) == 6, [r.body for r in requests]
    for request, message in zip(
        requests[2:], ["broken-reset", "broken-json", "broken-early", "good-3"], strict=True
    ):
        assert turns(request) == history("good-1", "good-2", then=message)
    say(server, client, "good-4")
    assert turns(fake.requests[-1]) == history("good-1", "good-2", "good-3", then="good-4")
    assert echo_text("good-3") in {m["content"] for m in fake.requests[-1].messages}
