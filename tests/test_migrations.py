"""Issue 15 item 8 (first part): versioned schema; a 66a5f54 database upgrades intact."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import argon2
import pytest

import cloudchat
from tests.conftest import PgDatabases, ServerFactory
from tests.helpers import ROOT, base_env, random_email, run_cli, strong_password

OLD_POSTGRES = ROOT / "tests" / "schema_66a5f54.sql"
OLD_SQLITE = ROOT / "tests" / "schema_66a5f54_sqlite.sql"
VERSIONS = [version for version, *_ in cloudchat.MIGRATIONS]


def _old_data(password: str) -> dict[str, Any]:
    """What a 66a5f54 server left behind: an account, a live session, a live reset token."""
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    now = dt.datetime.now(dt.UTC)
    return {
        "email": random_email(),
        "hash": hasher.hash(password),
        "session": secrets.token_urlsafe(32),
        "reset": secrets.token_urlsafe(32),
        "now": now,
        "later": now + dt.timedelta(hours=1),
    }


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _fill(execute: Any, data: dict[str, Any], text_times: bool) -> None:
    """Insert the old data through a DB-API `execute` (placeholders %s or ?)."""

    def when(value: dt.datetime) -> Any:
        return value.strftime("%Y-%m-%d %H:%M:%S.%f+00:00") if text_times else value

    execute(
        "INSERT INTO users (uid, email, is_active, created_at) VALUES (%s, %s, %s, %s)",
        (str(uuid.uuid4()), data["email"], True, when(data["now"])),
    )
    execute(
        "INSERT INTO credentials (user_id, type, secret, created_at, updated_at)"
        " VALUES (1, 'password', %s, %s, %s)",
        (data["hash"], when(data["now"]), when(data["now"])),
    )
    execute(
        "INSERT INTO sessions (id_hash, user_id, created_at, expires_at) VALUES (%s, 1, %s, %s)",
        (_sha(data["session"]), when(data["now"]), when(data["later"])),
    )
    execute(
        "INSERT INTO password_resets (token_hash, user_id, created_at, expires_at)"
        " VALUES (%s, 1, %s, %s)",
        (_sha(data["reset"]), when(data["now"]), when(data["later"])),
    )


def _assert_data_intact(server: Any, data: dict[str, Any], password: str) -> None:
    """The old session still signs in, the old password logs in, the old reset link works."""
    old = server.client()
    old.cookies["cc_auth"] = data["session"]
    me = old.me()
    assert me.status == 200, me
    assert me.json()["user"]["email"] == data["email"]
    assert server.client().login(data["email"], password).status == 200
    reset = server.client().post(
        "/auth/password/reset", {"token": data["reset"], "password": strong_password()}
    )
    assert reset.status == 200, reset


def test_sqlite_database_of_66a5f54_upgrades_at_start(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """The embedded server upgrades an old SQLite file at start; its data stays usable."""
    password = strong_password()
    data = _old_data(password)
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SQLITE.read_text())
        _fill(lambda sql, params: db.execute(sql.replace("%s", "?"), params), data, True)
    server = make_server.start("embedded", {"CLOUDCHAT_DB_PATH": str(path)})
    _assert_data_intact(server, data, password)
    with sqlite3.connect(path) as db:
        recorded = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
    assert recorded == VERSIONS


def test_postgres_database_of_66a5f54_upgrades_with_initdb(
    make_server: ServerFactory, pg: PgDatabases, tmp_path: Path
) -> None:
    """An old PostgreSQL database: the server refuses it (run initdb); initdb upgrades it
    under its lock; then the server serves it, every old row intact."""
    password = strong_password()
    data = _old_data(password)
    url = pg.create(from_template=False)
    conn = pg.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(OLD_POSTGRES.read_text())
            _fill(cur.execute, data, False)
    finally:
        conn.close()
    env, workdir = make_server.env("postgres", {"DATABASE_URL": url})
    refused = run_cli([], env, workdir, timeout=30)
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "older than this server's" in refused.stderr and "initdb" in refused.stderr
    done = run_cli(["initdb"], env, workdir)
    assert done.returncode == 0, (done.stdout, done.stderr)
    server = make_server.launch("postgres", env, workdir)
    _assert_data_intact(server, data, password)
    conn = pg.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT version FROM schema_migrations ORDER BY version")
            assert [row[0] for row in cur.fetchall()] == VERSIONS
    finally:
        conn.close()


@pytest.mark.parametrize("setup", ["embedded", "postgres"])
def test_a_newer_database_is_refused(make_server: ServerFactory, setup: str) -> None:
    """A schema version beyond this server's: initdb and the server exit 2, saying so."""
    env, workdir = make_server.env(setup)
    assert run_cli(["initdb"], env, workdir).returncode == 0
    future = cloudchat.SCHEMA_VERSION + 1
    statement = (
        "INSERT INTO schema_migrations (version, description, applied_at)"
        f" VALUES ({future}, 'from the future', '2099-01-01 00:00:00+00:00')"
    )
    if setup == "embedded":
        with sqlite3.connect(env["CLOUDCHAT_DB_PATH"]) as db:
            db.execute(statement)
    else:
        pg: PgDatabases = make_server.request.getfixturevalue("pg")
        conn = pg.connect(env["DATABASE_URL"])
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()
    for args in (["initdb"], []):
        done = run_cli(args, env, workdir, timeout=30)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert f"version {future}, newer than this server's" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr + done.stdout


def test_fresh_databases_record_every_version(tmp_path: Path) -> None:
    """A new SQLite file gets the whole schema and every version at once."""
    env = {**base_env(), "CLOUDCHAT_DB_PATH": str(tmp_path / "new.db")}
    assert run_cli(["initdb"], env, tmp_path).returncode == 0
    with sqlite3.connect(tmp_path / "new.db") as db:
        recorded = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
    assert recorded == VERSIONS
