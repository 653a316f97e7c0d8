"""Fixtures: throwaway PostgreSQL databases, a claimed Redis DB and real cloudchat servers."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.fakeprovider import FakeProvider
from tests.helpers import HIGH_LIMITS, SCHEMA, Server, base_env, random_hex
from tests.mailsink import MailSink

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_MARKER = "cloudchat-tests:claimed-by"
SETUPS = ("embedded", "postgres")


def pytest_configure(config: pytest.Config) -> None:
    """Turn warnings into errors for the whole suite."""
    config.addinivalue_line("filterwarnings", "error")


def unavailable(what: str) -> NoReturn:
    """Skip because a service is missing, or fail when CI=true (a skip counts as failure)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(what)


def _one_line(exc: BaseException) -> str:
    """Return an exception's message on one line."""
    return " ".join(str(exc).split())


class PgDatabases:
    """A session's template database and every database copied from it."""

    def __init__(self, psycopg2: Any, run_id: str) -> None:
        """Remember the driver; nothing is created yet."""
        self.psycopg2 = psycopg2
        self.template = f"cloudchat_tmpl_{run_id}"
        self.created: list[str] = []

    def admin(self, dbname: str = "postgres") -> Any:
        """Open an autocommit connection as the PostgreSQL superuser."""
        conn = self.psycopg2.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, connect_timeout=3
        )
        conn.autocommit = True
        return conn

    def connect(self, url: str) -> Any:
        """Open an autocommit connection to one of this run's databases, by its URL."""
        return self.admin(url.rsplit("/", 1)[1])

    def url(self, dbname: str) -> str:
        """Return the connection URL for one database."""
        return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"

    def create_template(self) -> None:
        """Create the template database and apply schema.sql to it."""
        conn = self.admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.template}"')
        finally:
            conn.close()
        self.created.append(self.template)
        # As `initdb` does: schema.sql plus the schema's versions recorded.
        import cloudchat

        store = cloudchat.PostgresStore(self.url(self.template), 1, 5.0)
        try:
            store.apply_schema(SCHEMA.read_text(encoding="utf-8"))
        finally:
            store.close()

    def create(self, *, from_template: bool = True) -> str:
        """Create a fresh database (a schema copy, or empty) and return its URL."""
        name = f"cc_{random_hex()}"
        template = self.template if from_template else "template0"
        conn = self.admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        finally:
            conn.close()
        self.created.append(name)
        return self.url(name)

    def drop_all(self) -> None:
        """Terminate connections to and drop every database this run created."""
        conn = self.admin()
        try:
            with conn.cursor() as cur:
                for name in reversed(self.created):
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()",
                        (name,),
                    )
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            conn.close()
        self.created.clear()


class RedisDb:
    """One Redis database number claimed for this run."""

    def __init__(self, client: Any, number: int, run_id: str) -> None:
        """Remember the claimed database."""
        self.client = client
        self.number = number
        self.run_id = run_id
        self.url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{number}"

    def flush(self) -> None:
        """FLUSHDB the run's database and keep it claimed."""
        self.client.flushdb()
        self.client.set(REDIS_MARKER, self.run_id, ex=3600)


@pytest.fixture(scope="session")
def run_id() -> str:
    """Return a random id naming this test run's resources."""
    return random_hex(4)


@pytest.fixture(scope="session")
def pg(run_id: str) -> Iterator[PgDatabases]:
    """Create the run's template database from schema.sql; drop everything at the end."""
    try:
        import psycopg2
    except ImportError:
        unavailable("psycopg2 is not installed; PostgreSQL tests cannot run")
    dbs = PgDatabases(psycopg2, run_id)
    try:
        dbs.admin().close()
    except psycopg2.OperationalError as exc:
        unavailable(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT}: {_one_line(exc)}")
    try:
        dbs.create_template()
        yield dbs
    finally:
        dbs.drop_all()


@pytest.fixture(scope="session")
def redis_db(run_id: str) -> Iterator[RedisDb]:
    """Claim an empty Redis DB (1..15) with a marker key; FLUSHDB it at the end."""
    try:
        import redis
    except ImportError:
        unavailable("redis-py is not installed; Redis tests cannot run")
    probe = redis.Redis(
        host=REDIS_HOST, port=REDIS_PORT, socket_timeout=3, socket_connect_timeout=3
    )
    try:
        probe.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}: {_one_line(exc)}")
    finally:
        probe.close()
    claimed: RedisDb | None = None
    for number in range(1, 16):
        client = redis.Redis(
            host=REDIS_HOST, port=REDIS_PORT, db=number, socket_timeout=3, socket_connect_timeout=3
        )
        if client.dbsize() == 0 and client.set(REDIS_MARKER, run_id, nx=True, ex=3600):
            if client.dbsize() == 1:
                claimed = RedisDb(client, number, run_id)
                break
            client.delete(REDIS_MARKER)
        client.close()
    if claimed is None:
        unavailable("no empty Redis database among 1..15 to claim for this run")
    assert claimed is not None
    try:
        yield claimed
    finally:
        claimed.client.flushdb()
        claimed.client.close()


class ServerFactory:
    """Starts cloudchat servers for one setup each and stops them all at teardown."""

    def __init__(self, request: pytest.FixtureRequest, tmp: pytest.TempPathFactory) -> None:
        """Keep the request (to reach the database fixtures lazily) and a temp factory."""
        self.request = request
        self.tmp = tmp
        self.servers: list[Server] = []

    def env(
        self, setup: str, overrides: Mapping[str, str | None] | None = None
    ) -> tuple[dict[str, str], Path]:
        """Return (environment, work directory) for a process of the given setup."""
        workdir = self.tmp.mktemp(f"cc-{setup}")
        env = base_env()
        if setup == "embedded":
            env["CLOUDCHAT_DB_PATH"] = str(workdir / "cloudchat.db")
        elif setup == "postgres":
            pg: PgDatabases = self.request.getfixturevalue("pg")
            rdb: RedisDb = self.request.getfixturevalue("redis_db")
            env["DATABASE_URL"] = pg.create()
            env["REDIS_URL"] = rdb.url
            env["REDIS_KEY_PREFIX"] = f"cc-test-{random_hex(4)}:"
        else:
            raise ValueError(f"unknown setup {setup!r}")
        for key, value in (overrides or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env, workdir

    def start(
        self, setup: str = "embedded", overrides: Mapping[str, str | None] | None = None
    ) -> Server:
        """Start a server and return it once it listens.

        No `initdb` first: the server creates the SQLite schema itself when it opens the
        file, and the PostgreSQL database is a copy of the schema template. Tests of
        `initdb` itself run it (tests/test_cli.py); here it would only cost a process start.
        """
        env, workdir = self.env(setup, overrides)
        return self.launch(setup, env, workdir)

    def launch(self, setup: str, env: Mapping[str, str], workdir: Path) -> Server:
        """Start a server with exactly this environment (e.g. a second one on the same data)."""
        server = Server(setup=setup, env=dict(env), workdir=workdir)
        self.servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        """Stop every server this factory started."""
        for server in self.servers:
            server.stop()
        self.servers.clear()


@pytest.fixture
def make_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerFactory]:
    """A factory for servers with special configuration, stopped after the test."""
    factory = ServerFactory(request, tmp_path_factory)
    try:
        yield factory
    finally:
        factory.stop_all()


def shared_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    overrides: Mapping[str, str | None],
    setup: str | None = None,
) -> Iterator[Server]:
    """The body of a module-scoped server fixture: one server in `setup` (by default the
    fixture's parameter), stopped when the fixture ends."""
    factory = ServerFactory(request, tmp_path_factory)
    try:
        yield factory.start(setup or request.param, overrides)
    finally:
        factory.stop_all()


@pytest.fixture(scope="module", params=SETUPS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server shared by one module's tests, once per setup, with rate limits out of the way."""
    yield from shared_server(request, tmp_path_factory, HIGH_LIMITS)


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    """One loopback fake model provider per test module; cleared per test by `fake`."""
    fake = FakeProvider()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def fake(provider: FakeProvider) -> Iterator[FakeProvider]:
    """The module's fake provider with no script and no recorded request."""
    provider.clear()
    yield provider
    provider.clear()


@pytest.fixture(scope="module")
def sink() -> Iterator[MailSink]:
    """One plain SMTP sink per test module; cleared per test by `mail`."""
    smtp = MailSink()
    try:
        yield smtp
    finally:
        smtp.stop()


@pytest.fixture
def mail(sink: MailSink) -> MailSink:
    """The module's SMTP sink, emptied for this test."""
    sink.clear()
    return sink
