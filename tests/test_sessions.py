"""Durable sessions (SQL row + Redis cache) and revocation through the Python API."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import RedisDb, ServerFactory
from tests.helpers import (
    Server,
    random_email,
    random_hex,
    random_phone,
    register_and_login,
    sql_rows,
)


@pytest.fixture
def pg_server(make_server: ServerFactory) -> Server:
    """A server on its own PostgreSQL copy and the run's Redis DB."""
    return make_server.start("postgres")


@pytest.fixture
def stores(pg_server: Server) -> Iterator[tuple[Any, Any, Any]]:
    """(cloudchat module, SQL store, key-value store) opened on the server's own config."""
    import cloudchat

    cfg = cloudchat.Config.from_env(dict(pg_server.env))
    sql = cloudchat.open_sql_store(cfg)
    kv = cloudchat.open_kv_store(cfg)
    try:
        yield cloudchat, sql, kv
    finally:
        kv.close()
        sql.close()


def test_sessions_survive_redis_flushdb(pg_server: Server, redis_db: RedisDb) -> None:
    """After FLUSHDB of the Redis cache the session still works, and logout still ends it."""
    client, _, _ = register_and_login(pg_server)
    other, _, _ = register_and_login(pg_server)
    assert client.me().status == 200
    redis_db.flush()
    response = client.me()
    assert response.status == 200, response
    assert other.me().status == 200
    old = client.cookies["cc_auth"]
    assert client.post("/auth/logout").status == 200
    redis_db.flush()
    replay = pg_server.client()
    replay.cookies["cc_auth"] = old
    assert replay.me().status == 401
    assert other.me().status == 200


def test_cached_session_lives_at_most_session_cache_seconds(
    make_server: ServerFactory, redis_db: RedisDb
) -> None:
    """The cache entry holds the user's public fields for SESSION_CACHE_SECONDS, no secret;
    an entry in another shape (an older release's plain user id) is refilled from SQL."""
    srv = make_server.start("postgres", {"SESSION_CACHE_SECONDS": "30"})
    client, _, password = register_and_login(srv, display_name="Cached")
    me = client.me().json()["user"]
    prefix = srv.env["REDIS_KEY_PREFIX"]
    (key,) = [k.decode() for k in redis_db.client.scan_iter(match=f"{prefix}sess:*")]
    assert 0 < redis_db.client.ttl(key) <= 30
    cached = json.loads(redis_db.client.get(key))
    fields = ("id", "uid", "email", "phone", "display_name", "email_verified", "mfa_enabled")
    assert cached == {name: me[name] for name in fields}
    raw = redis_db.client.get(key).decode()
    assert client.cookies["cc_auth"] not in raw and password not in raw
    redis_db.client.set(key, str(me["id"]), ex=30)  # the format before this release
    assert client.me().json()["user"] == me
    assert json.loads(redis_db.client.get(key)) == cached
    redis_db.client.set(key, "{not json", ex=30)
    assert client.me().json()["user"] == me


def test_revoke_user_sessions_ends_all_of_them_at_once(
    pg_server: Server, stores: tuple[Any, Any, Any]
) -> None:
    """revoke_user_sessions ends every session of one user, cached or not; others stay."""
    cloudchat, sql, kv = stores
    first, email, password = register_and_login(pg_server)
    second = pg_server.client()
    assert second.login(email, password).status == 200
    bystander, _, _ = register_and_login(pg_server)
    for client in (first, second, bystander):
        assert client.me().status == 200  # warm the cache
    user = cloudchat.get_user_by_email(sql, email)
    assert user is not None
    cfg = cloudchat.Config.from_env(dict(pg_server.env))
    assert cloudchat.revoke_user_sessions(sql, kv, cfg, user.id) == 2
    assert first.me().status == 401
    assert second.me().status == 401
    assert bystander.me().status == 200
    assert cloudchat.revoke_user_sessions(sql, kv, cfg, user.id) == 0
    fresh = pg_server.client()
    assert fresh.login(email, password).status == 200
    assert fresh.me().status == 200


def test_get_user_by_email(pg_server: Server, stores: tuple[Any, Any, Any]) -> None:
    """get_user_by_email returns the user's public fields, or None for an unknown address."""
    cloudchat, sql, _ = stores
    digits, formatted = random_phone()
    client, email, _ = register_and_login(pg_server, phone=formatted, display_name="Api User")
    user = cloudchat.get_user_by_email(sql, email)
    assert user is not None
    assert {"id", "uid", "email", "phone", "display_name", "is_active"} <= set(user.public())
    assert user.email == email
    assert user.display_name == "Api User"
    assert re.sub(r"\D", "", user.phone) == digits
    assert user.is_active in (True, 1)
    me = client.me().json()["user"]
    assert str(user.uid) == str(me["uid"])
    assert cloudchat.get_user_by_email(sql, random_email()) is None


def test_session_row_stores_only_a_hash_and_expires(
    make_server: ServerFactory, redis_db: RedisDb
) -> None:
    """The cookie value is never stored; the row's expiry is SESSION_TTL_SECONDS and enforced."""
    srv = make_server.start("postgres", {"SESSION_TTL_SECONDS": "3600"})
    client, _, _ = register_and_login(srv)
    session_id = client.cookies["cc_auth"]
    rows = sql_rows(
        srv, "SELECT id_hash, extract(epoch FROM expires_at - created_at) AS ttl FROM sessions"
    )
    assert len(rows) == 1, rows
    id_hash, ttl = rows[0]["id_hash"], rows[0]["ttl"]
    assert session_id not in id_hash
    assert abs(float(ttl) - 3600) < 60, ttl
    sql_rows(srv, "UPDATE sessions SET expires_at = now() - interval '1 second'")
    redis_db.flush()
    assert client.me().status == 401


def test_redis_from_host_port_db_and_key_prefix(
    make_server: ServerFactory, redis_db: RedisDb
) -> None:
    """REDIS_HOST/REDIS_PORT/REDIS_DB work like REDIS_URL; keys carry REDIS_KEY_PREFIX only."""
    prefix = f"cc-prefix-{random_hex(4)}:"
    srv = make_server.start(
        "postgres",
        {
            "REDIS_URL": None,
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": "6379",
            "REDIS_DB": str(redis_db.number),
            "REDIS_KEY_PREFIX": prefix,
        },
    )
    assert srv.client().get("/auth/healthz").json()["redis"] is True
    client, email, _ = register_and_login(srv)
    assert client.me().status == 200
    keys = [key.decode() for key in redis_db.client.scan_iter(match=f"{prefix}*")]
    assert keys, "the server wrote no key with its prefix to the configured Redis DB"
    session_id = client.cookies["cc_auth"]
    for key in keys:
        assert email not in key and session_id not in key, key
