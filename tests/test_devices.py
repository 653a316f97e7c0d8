"""Issue 15 item 1 (first slice): sessions per device, their revocation, logout scopes."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import RedisDb, ServerFactory, shared_server
from tests.helpers import (
    ALL_LIMITS_RAISED,
    UNAUTHORIZED,
    Client,
    Server,
    assert_error,
    random_email,
    sql_rows,
    strong_password,
)


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server per setup, limits out of the way."""
    yield from shared_server(request, tmp_path_factory, ALL_LIMITS_RAISED)


def _devices(server: Server, count: int) -> tuple[str, str, list[Client]]:
    """A fresh account signed in on `count` browsers, each with its own user agent."""
    email, password = random_email(), strong_password()
    assert server.client().register(email, password).status == 201
    browsers = []
    for n in range(count):
        browser = server.client({"User-Agent": f"device-{n}"})
        assert browser.login(email, password).status == 200
        browsers.append(browser)
    return email, password, browsers


def test_list_shows_every_device_and_the_current_one(server: Server) -> None:
    """GET /auth/sessions: each live session, newest first, with its agent, the current
    one flagged, times in ISO 8601 UTC; the public id is not the cookie nor its hash."""
    _, _, (first, second, third) = _devices(server, 3)
    answer = second.get("/auth/sessions")
    assert answer.status == 200, answer
    sessions = answer.json()["sessions"]
    assert [s["user_agent"] for s in sessions] == ["device-2", "device-1", "device-0"]
    assert [s["current"] for s in sessions] == [False, True, False]
    for session in sessions:
        assert re.fullmatch(r"[0-9a-f]{32}", session["id"]), session
        for key in ("created_at", "last_seen_at", "expires_at"):
            assert session[key].endswith("Z"), session
        assert session["ip"]
    cookies = [b.cookies["cc_auth"] for b in (first, second, third)]
    hashes = [hashlib.sha256(c.encode()).hexdigest() for c in cookies]
    for session in sessions:
        assert session["id"] not in cookies and all(session["id"] not in h for h in hashes)


def test_revoke_one_device(server: Server) -> None:
    """DELETE /auth/sessions/<id> ends that device's session at once; the others stay."""
    _, _, (first, second) = _devices(server, 2)
    target = next(s for s in first.get("/auth/sessions").json()["sessions"] if not s["current"])
    answer = first.request("DELETE", f"/auth/sessions/{target['id']}")
    assert answer.status == 200 and answer.json() == {"ok": True}, answer
    assert_error(second.me(), 401, "unauthorized")
    assert first.me().status == 200
    assert len(first.get("/auth/sessions").json()["sessions"]) == 1
    again = first.request("DELETE", f"/auth/sessions/{target['id']}")
    assert_error(again, 404, "not_found")


def test_deleting_the_current_session_is_a_logout(server: Server) -> None:
    """Revoking the current session clears the cookie, as a logout does."""
    _, _, (browser,) = _devices(server, 1)
    (own,) = browser.get("/auth/sessions").json()["sessions"]
    answer = browser.request("DELETE", f"/auth/sessions/{own['id']}")
    assert answer.status == 200
    cookie = answer.cookie("cc_auth")
    assert cookie is not None and cookie[1].get("max-age") == "0"
    assert_error(browser.me(), 401, "unauthorized")


def test_another_users_session_looks_unknown(server: Server) -> None:
    """Another user's session id answers exactly like an unknown one, and stays live."""
    _, _, (alice,) = _devices(server, 1)
    _, _, (bob,) = _devices(server, 1)
    (bobs,) = bob.get("/auth/sessions").json()["sessions"]
    foreign = alice.request("DELETE", f"/auth/sessions/{bobs['id']}")
    unknown = alice.request("DELETE", f"/auth/sessions/{'0' * 32}")
    assert_error(foreign, 404, "not_found")
    assert foreign.json() == unknown.json()
    assert bob.me().status == 200


@pytest.mark.parametrize("session_id", ["x", "0" * 31, "Z" * 32, "%C3%A9" * 16, "0" * 33, "%00"])
def test_malformed_ids_are_404(server: Server, session_id: str) -> None:
    """Bad ids: 404, never a 5xx."""
    _, _, (browser,) = _devices(server, 1)
    assert_error(browser.request("DELETE", f"/auth/sessions/{session_id}"), 404, "not_found")


def test_without_a_session_both_are_401(server: Server) -> None:
    """No session: the list and the revocation are 401."""
    anonymous = server.client()
    assert anonymous.get("/auth/sessions").json() == UNAUTHORIZED
    answer = anonymous.request("DELETE", f"/auth/sessions/{'0' * 32}")
    assert answer.status == 401 and answer.json() == UNAUTHORIZED


@pytest.mark.parametrize(("scope", "kept", "ended"), [("local", 2, 1), ("others", 1, 2)])
def test_logout_scopes(server: Server, scope: str, kept: int, ended: int) -> None:
    """POST /auth/logout {"scope"}: local ends this one; others all but this one."""
    _, _, (first, second, third) = _devices(server, 3)
    answer = first.post("/auth/logout", {"scope": scope})
    assert answer.status == 200 and answer.json() == {"ok": True, "revoked_sessions": ended}
    alive = [b.me().status == 200 for b in (first, second, third)]
    assert sum(alive) == kept
    assert alive[0] == (scope == "others")


def test_logout_global_ends_everything_and_reset_links(server: Server) -> None:
    """global: every session of the account, this one included, and reset links."""
    email, password, browsers = _devices(server, 3)
    token = server.client().post("/auth/password/forgot", {"identifier": email}).json()
    answer = browsers[0].post("/auth/logout", {"scope": "global"})
    assert answer.json() == {"ok": True, "revoked_sessions": 3}
    assert all(b.me().status == 401 for b in browsers)
    if "debug_token" in token:
        reset = server.client().post(
            "/auth/password/reset", {"token": token["debug_token"], "password": strong_password()}
        )
        assert reset.status == 400
    assert server.client().login(email, password).status == 200


@pytest.mark.parametrize("scope", ["everything", "", 3, None, ["local"]])
def test_bad_scope_is_400(server: Server, scope: object) -> None:
    """An unknown or mistyped scope: 400, and nothing ends."""
    _, _, (browser,) = _devices(server, 1)
    answer = browser.post("/auth/logout", {"scope": scope})
    if scope in ("", None):  # absent or empty: the default, local
        assert answer.status == 200
        return
    assert answer.status == 400, answer
    assert browser.me().status == 200


def test_concurrent_revocations_end_each_session_once(server: Server) -> None:
    """Two devices revoking the same third one at once: one 200, one 404."""
    _, _, (first, second, third) = _devices(server, 3)
    target = next(
        s["id"]
        for s in first.get("/auth/sessions").json()["sessions"]
        if s["user_agent"] == "device-2"
    )
    results: list[int] = []
    barrier = threading.Barrier(2)

    def revoke(browser: Client) -> None:
        barrier.wait(10)
        results.append(browser.request("DELETE", f"/auth/sessions/{target}").status)

    threads = [threading.Thread(target=revoke, args=(b,)) for b in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results) in ([200, 200], [200, 404])
    assert third.me().status == 401


def _stored_time(ago: dt.timedelta) -> str:
    """A time that long ago, written as the server stores times (either database reads it)."""
    return (dt.datetime.now(dt.UTC) - ago).strftime("%Y-%m-%d %H:%M:%S.%f+00:00")


def test_beyond_the_maximum_the_least_recently_used_ends(make_server: ServerFactory) -> None:
    """SESSION_MAX_PER_USER=2: a third login ends the session used longest ago."""
    server = make_server.start("embedded", {**ALL_LIMITS_RAISED, "SESSION_MAX_PER_USER": "2"})
    email, password, (first, second) = _devices(server, 2)
    # The second device was last used an hour ago, the first one just now.
    sql_rows(
        server,
        "UPDATE sessions SET last_seen_at = %s WHERE user_agent = 'device-1'",
        (_stored_time(dt.timedelta(hours=1)),),
    )
    third = server.client({"User-Agent": "device-2"})
    assert third.login(email, password).status == 200
    assert [b.me().status for b in (first, second, third)] == [200, 401, 200]
    agents = [s["user_agent"] for s in third.get("/auth/sessions").json()["sessions"]]
    assert agents == ["device-2", "device-0"]


@pytest.mark.parametrize("setup", ["embedded", "postgres"])
def test_an_idle_session_ends(make_server: ServerFactory, setup: str) -> None:
    """SESSION_IDLE_SECONDS: a session unused for longer is not live any more, and not
    listed; one used within it is."""
    server = make_server.start(setup, {**ALL_LIMITS_RAISED, "SESSION_IDLE_SECONDS": "3600"})
    _, _, (idle, busy) = _devices(server, 2)
    sql_rows(
        server,
        "UPDATE sessions SET last_seen_at = %s WHERE user_agent = 'device-0'",
        (_stored_time(dt.timedelta(hours=2)),),
    )
    if setup == "postgres":
        # The cache may vouch for the session up to SESSION_CACHE_SECONDS: as after that.
        rdb: RedisDb = make_server.request.getfixturevalue("redis_db")
        rdb.client.delete(*rdb.client.keys(server.env["REDIS_KEY_PREFIX"] + "sess:*"))
    assert_error(idle.me(), 401, "unauthorized")
    assert busy.me().status == 200
    agents = [s["user_agent"] for s in busy.get("/auth/sessions").json()["sessions"]]
    assert agents == ["device-1"]


def test_session_endpoints_are_rate_limited(make_server: ServerFactory) -> None:
    """RATE_ACCOUNT: listing and ending sessions count per account; beyond, 429."""
    server = make_server.start("embedded", {**ALL_LIMITS_RAISED, "RATE_ACCOUNT": "3/60"})
    _, _, (browser, other) = _devices(server, 2)
    for _ in range(2):
        assert browser.get("/auth/sessions").status == 200
    assert browser.request("DELETE", f"/auth/sessions/{'0' * 32}").status == 404
    limited = browser.get("/auth/sessions")
    assert_error(limited, 429, "rate_limited")
    assert int(limited.header("Retry-After") or 0) > 0
    # The same account from its other device: the limit is the account's.
    assert_error(other.request("DELETE", f"/auth/sessions/{'0' * 32}"), 429, "rate_limited")
