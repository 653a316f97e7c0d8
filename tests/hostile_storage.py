"""What a server stored, read behind its back: every SQL row, every Redis key, the SQLite bytes.

Helpers for the hostile tests (test_fuzz, test_secrets): they look at storage the way an
attacker with a stolen backup would, and check it against the schema's promises.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.helpers import Server, sql_rows

PHONE_STORED_RE = re.compile(r"\+?[0-9]{5,20}")
HASH_RE = re.compile(r"[0-9a-f]{64}")


def sql_tables(server: Server) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table of the server's database, as {table: [{column: value}]}."""
    if server.env.get("DATABASE_URL"):
        listed = sql_rows(
            server,
            "SELECT table_name AS name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
        )
    else:
        listed = sql_rows(
            server,
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )
    names = sorted(row["name"] for row in listed)
    return {name: sql_rows(server, f'SELECT * FROM "{name}"') for name in names}


def sql_text(tables: dict[str, list[dict[str, Any]]]) -> str:
    """Every table name, column and value as one searchable text."""
    parts = []
    for name, rows in tables.items():
        for row in rows:
            parts.append(f"{name}: " + " | ".join(f"{k}={v!s}" for k, v in row.items()))
    return "\n".join(parts)


def sqlite_file_bytes(server: Server) -> bytes:
    """The raw bytes of the SQLite database file and its -wal and -shm companions."""
    base = Path(server.env["CLOUDCHAT_DB_PATH"])
    data = b""
    for path in (base, Path(f"{base}-wal"), Path(f"{base}-shm"), Path(f"{base}-journal")):
        if path.exists():
            data += path.read_bytes()
    return data


def redis_items(client: Any) -> list[tuple[bytes, bytes]]:
    """(key, value) for every key of a Redis database, whatever its type; values flattened."""
    items: list[tuple[bytes, bytes]] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "hash":
            values = [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "none":  # expired between SCAN and TYPE
            continue
        else:
            values = [f"<{kind}>".encode()]
        items.append((key, b"\n".join(_as_bytes(v) for v in values)))
    return items


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


def _walk_strings(value: Any) -> list[str]:
    """The text values inside one stored value (str, or bytes decoded loosely)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, bytes | bytearray | memoryview):
        return [bytes(value).decode("latin-1")]
    return []


def schema_violations(tables: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Every stored record that breaks the schema's promises, as readable sentences."""
    problems: list[str] = []
    users = tables.get("users", [])
    user_ids = {user["id"] for user in users}
    for user in users:
        email, phone, name = user["email"], user["phone"], user["display_name"]
        if not isinstance(email, str) or email != email.strip().lower() or "@" not in email:
            problems.append(f"users.id={user['id']}: email {email!r} not trimmed/lower/with @")
        if phone is not None and not PHONE_STORED_RE.fullmatch(str(phone)):
            problems.append(f"users.id={user['id']}: phone {phone!r} not normalised")
        if name is not None and (len(name) > 64 or not name.isprintable()):
            problems.append(f"users.id={user['id']}: display_name {name!r} too long or unprintable")
    for table in ("credentials", "sessions", "password_resets"):
        for row in tables.get(table, []):
            if row["user_id"] not in user_ids:
                problems.append(f"{table}: row {row!r} belongs to no user")
    for row in tables.get("sessions", []):
        if not HASH_RE.fullmatch(str(row["id_hash"])):
            problems.append(f"sessions: id_hash {row['id_hash']!r} is not a SHA-256 hex digest")
    for row in tables.get("password_resets", []):
        if not HASH_RE.fullmatch(str(row["token_hash"])):
            problems.append(f"password_resets: token_hash {row['token_hash']!r} is not a digest")
    for table, rows in tables.items():
        for row in rows:
            for column, value in row.items():
                if any("\x00" in text for text in _walk_strings(value)):
                    problems.append(f"{table}.{column}: NUL stored in {value!r} (row {row!r})")
    return problems
