"""The deployment kit in deploy/, proved on real processes.

Real nginx (the shipped location block, unchanged) in front of two real servers that reach
PostgreSQL through real PgBouncer (the shipped pgbouncer.ini: transaction mode, SCRAM against
a secret copied from pg_authid) and share one Redis: deploy/smoke.sh passes through it, chat
streams line by line, sessions never leak between clients, a client's own X-Forwarded-For
cannot dodge a rate limit, and sessions, limits and chat history hold across instances.
The systemd units pass `systemd-analyze verify`, the Redis and PostgreSQL settings are read
by the real servers, and the memory caps add up to the budget in README.md.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PG_PORT, PgDatabases, RedisDb, ServerFactory, unavailable
from tests.deploy_stack import (
    DEPLOY,
    NGINX_DIR,
    Nginx,
    PgBouncer,
    Process,
    find_binary,
    find_postgres,
    nginx_main_conf,
    private_dir,
    unprivileged_user,
    upstream_conf,
)
from tests.fakeprovider import FakeProvider, Reply, echo_text
from tests.helpers import (
    HIGH_LIMITS,
    REQUEST_TIMEOUT,
    Client,
    Response,
    Server,
    base_env,
    free_port,
    random_email,
    random_hex,
    run_cli,
    strong_password,
    wait_until,
)

PREFIX = "/cloudchat"
SYSTEM = "You are a helpful assistant."
PAIR_LOGIN_IDENTIFIER_LIMIT = 4
UNITS = DEPLOY / "systemd"
DROP_INS = ("redis-server.service", "postgresql@.service", "pgbouncer.service", "nginx.service")
# The statement deploy/README.md gives for PgBouncer's auth_file.
USERLIST_SQL = (
    "SELECT '\"' || rolname || '\" \"' || rolpassword || '\"' FROM pg_authid WHERE rolname = %s"
)
SMOKE_STEPS = (
    "healthz",
    "no-cache",
    "register",
    "login",
    "me",
    "chat",
    "reset_chat",
    "logout",
    "me-after-logout",
    "forgot",
    "reset",
    "login-new",
    "logout-new",
)


###############################################################################
# Clients
###############################################################################


class ProxiedClient(Client):
    """A cookie-keeping client that talks to the app through nginx, under /cloudchat."""

    def __init__(self, port: int, source: str | None = None) -> None:
        """Talk to nginx on 127.0.0.1:port, from a chosen loopback source address if given."""
        super().__init__("127.0.0.1", port)
        self.source = source

    def request(self, method: str, path: str, **kwargs: Any) -> Response:
        """Send one request under the prefix (from the source address when one is set)."""
        if self.source is None:
            return super().request(method, PREFIX + path, **kwargs)
        return _request_from(self, self.source, method, PREFIX + path, **kwargs)


def _request_from(
    client: Client,
    source: str,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """One request from a given loopback source address, keeping the client's cookie jar."""
    send = {"Content-Type": "application/json", **(headers or {})}
    if client.cookies:
        send["Cookie"] = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    body = json.dumps(json_body).encode() if json_body is not None else None
    conn = http.client.HTTPConnection(
        client.host, client.port, timeout=REQUEST_TIMEOUT, source_address=(source, 0)
    )
    try:
        conn.request(method, path, body=body, headers=send)
        raw = conn.getresponse()
        response = Response(raw.status, raw.msg, raw.read(), 0.0)
    finally:
        conn.close()
    for name, value, attrs in response.set_cookies():
        if attrs.get("max-age") == "0" or value == "":
            client.cookies.pop(name, None)
        else:
            client.cookies[name] = value
    return response


def register(client: Client) -> tuple[str, str]:
    """Register a fresh account through the client; return (email, password)."""
    email, password = random_email(), strong_password()
    response = client.register(email, password)
    assert response.status == 201, response
    return email, password


def logged_in(port: int) -> tuple[ProxiedClient, str]:
    """A client logged in through nginx as a fresh user, and the user's email."""
    client = ProxiedClient(port)
    email, password = register(client)
    assert client.login(email, password).status == 200
    return client, email


def copy_cookies(source: Client, target: Client) -> Client:
    """Give target the source's cookies (the same browser talking to another address)."""
    target.cookies = dict(source.cookies)
    return target


def chat_lines(response: Response) -> list[dict[str, Any]]:
    """The NDJSON lines of a finished chat answer."""
    assert response.status == 200, response
    return [json.loads(line) for line in response.body.splitlines() if line.strip()]


###############################################################################
# The stack: PostgreSQL role + database, PgBouncer, two servers, nginx
###############################################################################


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    """The nginx binary (CI installs it)."""
    binary = find_binary("nginx")
    if binary is None:
        unavailable("nginx is not installed (apt-get install nginx); deployment tests need it")
    assert binary is not None
    return binary


@pytest.fixture(scope="module")
def pgbouncer_bin() -> str:
    """The pgbouncer binary (CI installs it)."""
    binary = find_binary("pgbouncer")
    if binary is None:
        unavailable(
            "pgbouncer is not installed (apt-get install pgbouncer); deployment tests need it"
        )
    assert binary is not None
    return binary


@pytest.fixture(scope="module")
def curl_bin() -> str:
    """curl, which deploy/smoke.sh needs."""
    binary = find_binary("curl")
    if binary is None:
        unavailable("curl is not installed; deploy/smoke.sh needs it")
    assert binary is not None
    return binary


@pytest.fixture(scope="module")
def database(pg: PgDatabases) -> Iterator[tuple[str, str, str]]:
    """(role, password, database) as deploy/README.md makes them: a SCRAM role, its database."""
    role, password = f"cc_deploy_{random_hex(4)}", strong_password()
    dbname = pg.create(from_template=False).rsplit("/", 1)[1]
    conn = pg.admin()
    try:
        with conn.cursor() as cur:
            cur.execute("SET password_encryption = 'scram-sha-256'")
            cur.execute(f'CREATE ROLE "{role}" LOGIN PASSWORD %s', (password,))
            cur.execute(f'ALTER DATABASE "{dbname}" OWNER TO "{role}"')
        yield role, password, dbname
    finally:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            cur.execute(f'DROP ROLE IF EXISTS "{role}"')
        conn.close()


@pytest.fixture(scope="module")
def bouncer(
    pgbouncer_bin: str, pg: PgDatabases, database: tuple[str, str, str]
) -> Iterator[PgBouncer]:
    """PgBouncer from the shipped ini, its auth_file holding the role's SCRAM secret."""
    role, _, dbname = database
    conn = pg.admin()
    try:
        with conn.cursor() as cur:
            cur.execute(USERLIST_SQL, (role,))
            (line,) = cur.fetchone()
    finally:
        conn.close()
    assert '"SCRAM-SHA-256$' in line, "the role's secret is not SCRAM"
    bouncer = PgBouncer(pgbouncer_bin, PG_PORT, dbname, line + "\n")
    try:
        yield bouncer.start()
    finally:
        bouncer.stop()


@pytest.fixture(scope="module")
def stack_env(
    bouncer: PgBouncer,
    database: tuple[str, str, str],
    redis_db: RedisDb,
    provider: FakeProvider,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """Settings of an instance behind the stack; `initdb` already ran through PgBouncer."""
    role, password, _ = database
    env = base_env()
    env.update(HIGH_LIMITS)
    env.update(
        {
            "DATABASE_URL": f"postgresql://{role}:{password}@127.0.0.1:{bouncer.port}/cloudchat",
            "REDIS_URL": redis_db.url,
            "REDIS_KEY_PREFIX": f"cc-deploy-{random_hex(4)}:",
            "DEBUG_RETURN_RESET_TOKEN": "1",
            "RATE_LOGIN_IDENTIFIER": f"{PAIR_LOGIN_IDENTIFIER_LIMIT}/600",
            "RATE_CHAT_VISITOR": "100000/60",
            "RATE_CHAT_IP": "100000/60",
            "DEEPSEEK_API_KEY": "sk-test-deploy",
            "DEEPSEEK_BASE_URL": provider.url(),
            "CHAT_PROVIDER": "deepseek",
        }
    )
    done = run_cli(["initdb"], env, tmp_path_factory.mktemp("cc-initdb"))
    assert done.returncode == 0, f"initdb through PgBouncer failed: {done.stdout}{done.stderr}"
    return env


@pytest.fixture(scope="module")
def pair(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    stack_env: dict[str, str],
) -> Iterator[tuple[Server, Server]]:
    """Two instances with the same settings: one PostgreSQL (via PgBouncer), one Redis."""
    factory = ServerFactory(request, tmp_path_factory)
    try:
        first = factory.launch("postgres", stack_env, tmp_path_factory.mktemp("cc-one"))
        second = factory.launch("postgres", stack_env, tmp_path_factory.mktemp("cc-two"))
        yield first, second
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def front(nginx_bin: str, pair: tuple[Server, Server]) -> Iterator[Nginx]:
    """nginx with the shipped location block, balancing over both instances."""
    nginx = Nginx(nginx_bin, [pair[0].port, pair[1].port])
    try:
        yield nginx.start()
    finally:
        nginx.stop()


@pytest.fixture
def spare_nginx(nginx_bin: str) -> Iterator[Any]:
    """Start extra nginx instances in a test (own upstream lists); stopped afterwards."""
    started: list[Nginx] = []

    def start(ports: list[int]) -> Nginx:
        nginx = Nginx(nginx_bin, ports)
        started.append(nginx)
        return nginx.start()

    try:
        yield start
    finally:
        for nginx in started:
            nginx.stop()


def run_smoke(base_url: str) -> subprocess.CompletedProcess[str]:
    """Run deploy/smoke.sh against a base URL."""
    return subprocess.run(
        ["bash", str(DEPLOY / "smoke.sh"), base_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


###############################################################################
# Through nginx
###############################################################################


def test_smoke_script_passes_through_nginx(curl_bin: str, front: Nginx, fake: FakeProvider) -> None:
    """deploy/smoke.sh walks every step, the password reset included, through nginx + PgBouncer."""
    done = run_smoke(f"http://127.0.0.1:{front.port}{PREFIX}")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == list(SMOKE_STEPS), done.stdout
    assert all(line.startswith("ok ") for line in lines[:-1]), done.stdout
    assert lines[-1] == "smoke test passed"
    # The chat went to the provider with the smoke test's message.
    assert fake.requests and fake.requests[0].turns()[-1] == ("user", "Hello from the smoke test")


def test_smoke_script_names_the_failing_step(curl_bin: str, spare_nginx: Any) -> None:
    """With no instance behind nginx the smoke test stops at its first step and says so."""
    nginx = spare_nginx([free_port()])
    done = run_smoke(f"http://127.0.0.1:{nginx.port}{PREFIX}")
    assert done.returncode == 1, done
    assert len(done.stdout.splitlines()) == 1, done.stdout
    assert done.stdout.startswith("FAIL  healthz"), done.stdout
    assert "HTTP 503" in done.stdout and '"code":"unavailable"' in done.stdout, done.stdout
    assert "failed at step: healthz" in done.stderr


def test_prefix_is_stripped_and_nginx_request_id_adopted(
    front: Nginx, pair: tuple[Server, Server]
) -> None:
    """/cloudchat/auth/me reaches the app as /auth/me, under nginx's id, not the client's."""
    client_rid = str(uuid.uuid4())
    response = ProxiedClient(front.port).get("/auth/me", headers={"X-Request-ID": client_rid})
    assert response.status == 401, response
    rid = response.header("X-Request-ID")
    assert rid is not None and rid != client_rid
    assert uuid.UUID(rid).hex == rid.replace("-", "")  # nginx's 32 hex digits, as a UUID
    # The line is written before the answer, but reaches this process through a pipe.
    logged = re.compile(rf"GET /auth/me 401 \S+ rid={rid}")
    wait_until(
        lambda: any(logged.search(server.log_text()) for server in pair),
        5,
        what=f"the log line of request {rid}",
    )
    assert response.header("Cache-Control") == "no-store"


def test_chat_lines_arrive_while_the_provider_still_writes(
    front: Nginx, fake: FakeProvider
) -> None:
    """The first line reaches the visitor through nginx while the provider holds back the rest."""
    gate = threading.Event()
    fake.script(Reply(deltas=["first ", "second"], gate=gate))
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request(
            "POST",
            f"{PREFIX}/deepseek_chat",
            body=json.dumps({"message": "stream please"}),
            # As browsers do: the site gzips every type, which would hold lines back.
            headers={"Content-Type": "application/json", "Accept-Encoding": "gzip"},
        )
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("application/x-ndjson")
        assert json.loads(response.readline()) == {"text": "first "}
        (sent,) = fake.wait_requests(1)
        assert not sent.finished.is_set(), "the provider finished before the first line arrived"
        gate.set()
        rest = [json.loads(line) for line in response.read().splitlines()]
        assert rest[0] == {"text": "second"}
        assert rest[-1].get("done") is True
        assert sent.finished.wait(REQUEST_TIMEOUT)
    finally:
        gate.set()
        conn.close()


def test_visitor_hangup_through_nginx_closes_the_provider_stream(
    front: Nginx, fake: FakeProvider
) -> None:
    """A visitor who leaves mid-answer frees the provider connection, nginx in between."""
    gate = threading.Event()
    fake.script(Reply(deltas=["partial ", "never sent"], gate=gate))
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request(
            "POST",
            f"{PREFIX}/deepseek_chat",
            body=json.dumps({"message": "I will leave"}),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        assert json.loads(response.readline()) == {"text": "partial "}
        (sent,) = fake.wait_requests(1)
        response.close()
        conn.close()
        assert sent.connection.closed.wait(REQUEST_TIMEOUT), "provider connection still open"
        assert sent.connection.client_closed
        assert not sent.finished.is_set()
    finally:
        gate.set()
        conn.close()


def test_me_is_never_served_to_another_client(front: Nginx) -> None:
    """Interleaved and concurrent /auth/me of two users and an anonymous client never mix."""
    alice, alice_email = logged_in(front.port)
    bob, bob_email = logged_in(front.port)
    anonymous = ProxiedClient(front.port)
    expected = {id(alice): alice_email, id(bob): bob_email, id(anonymous): None}

    def check(client: ProxiedClient) -> None:
        response = client.me()
        assert response.header("Cache-Control") == "no-store"
        want = expected[id(client)]
        if want is None:
            assert response.status == 401, response
        else:
            assert response.status == 200, response
            assert response.json()["user"]["email"] == want

    order = [alice, bob, anonymous] * 12
    random.Random(5).shuffle(order)
    for client in order:
        check(client)
    with ThreadPoolExecutor(max_workers=9) as pool:
        for result in [pool.submit(check, client) for client in order * 2]:
            result.result()


def test_body_limit_matches_the_app_and_answers_json(front: Nginx) -> None:
    """client_max_body_size lets exactly MAX_BODY_BYTES through; one more byte is a JSON 413."""
    import cloudchat

    limit = cloudchat.Config().max_body_bytes

    def login_body(size: int) -> bytes:
        head = json.dumps({"identifier": random_email(), "password": "Wrong-pass-1", "pad": ""})
        return head[:-2].encode() + b"x" * (size - len(head)) + b'"}'

    client = ProxiedClient(front.port)
    at_limit = client.post(
        "/auth/login", body=login_body(limit), headers={"Content-Type": "application/json"}
    )
    assert at_limit.status == 401, at_limit  # the app read it and refused the credentials
    over = client.post(
        "/auth/login", body=login_body(limit + 1), headers={"Content-Type": "application/json"}
    )
    assert over.status == 413, over
    assert over.json() == {
        "ok": False,
        "error": "Request body too large",
        "code": "body_too_large",
    }
    assert over.header("X-Request-ID") is None  # nginx answered; the app never saw it


def test_forwarded_for_from_the_client_cannot_escape_the_login_limit(
    stack_env: dict[str, str],
    make_server: ServerFactory,
    tmp_path: Path,
    spare_nginx: Any,
) -> None:
    """Each attempt with a made-up X-Forwarded-For still counts against the real address."""
    env = {**stack_env, "RATE_LOGIN_IP": "3/600", "REDIS_KEY_PREFIX": f"cc-xff-{random_hex(4)}:"}
    server = make_server.launch("postgres", env, tmp_path)
    nginx = spare_nginx([server.port])
    client = ProxiedClient(nginx.port)
    email, password = register(client)
    for _ in range(3):
        spoof = {"X-Forwarded-For": f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"}
        response = client.post(
            "/auth/login",
            {"identifier": random_email(), "password": "Wrong-pass-1"},
            headers=spoof,
        )
        assert response.status == 401, response
    spoof = {"X-Forwarded-For": "198.19.0.1, 198.19.0.2"}
    assert client.login(email, password).status == 401
    blocked = client.post("/auth/login", {"identifier": email, "password": password}, headers=spoof)
    assert blocked.status == 401, blocked
    # The limit is on the address nginx saw: another loopback address still gets in.
    other = ProxiedClient(nginx.port, source="127.0.0.2")
    assert other.login(email, password).status == 200
    assert other.me().json()["user"]["email"] == email


def test_nginx_routes_around_an_instance_that_is_down(
    spare_nginx: Any, pair: tuple[Server, Server]
) -> None:
    """A stopped instance (a port nobody listens on) costs no request: nginx uses the other."""
    nginx = spare_nginx([free_port(), pair[0].port])
    client = ProxiedClient(nginx.port)
    email, password = register(client)
    for _ in range(3):  # under RATE_LOGIN_IDENTIFIER, whichever instance counts
        assert client.get("/auth/healthz").status == 200
        assert client.login(email, password).status == 200
    down = spare_nginx([free_port()])
    response = ProxiedClient(down.port).get("/auth/healthz")
    assert response.status == 503, response
    assert response.json()["code"] == "unavailable"


###############################################################################
# Two instances, one PostgreSQL (through PgBouncer), one Redis
###############################################################################


def test_nginx_balances_over_both_instances(front: Nginx, pair: tuple[Server, Server]) -> None:
    """Requests through the upstream reach both instances."""
    client = ProxiedClient(front.port)
    rids = [client.get("/test").json()["request_id"] for _ in range(8)]
    for server in pair:
        wait_until(
            lambda server=server: any(f"rid={rid}" in server.log_text() for rid in rids),
            5,
            what=f"a request logged by the instance on port {server.port}",
        )


def test_login_on_one_instance_holds_on_the_other(
    front: Nginx, pair: tuple[Server, Server]
) -> None:
    """A session made on one instance works on the other; a logout on either ends it on both."""
    one, two = pair
    email, password = register(ProxiedClient(front.port))
    on_one = one.client()
    assert on_one.login(email, password).status == 200
    on_two = copy_cookies(on_one, two.client())
    proxied = copy_cookies(on_one, ProxiedClient(front.port))
    for client in (on_one, on_two, proxied, proxied):
        response = client.me()
        assert response.status == 200, response
        assert response.json()["user"]["email"] == email
    assert on_two.post("/auth/logout").status == 200
    for client in (on_one, proxied, proxied):
        assert client.me().status == 401


def test_login_limit_is_shared_by_the_instances(pair: tuple[Server, Server]) -> None:
    """Attempts on both instances add up: neither alone is over the limit, together they are."""
    one, two = pair
    email, password = register(one.client())
    assert two.client().login(email, password).status == 200
    attempts = [one, two, one][: PAIR_LOGIN_IDENTIFIER_LIMIT - 1]
    for server in attempts:
        assert server.client().login(email, "Wrong-pass-1").status == 401
    # two has seen 2 attempts, one has seen 2: the shared count is now at the limit.
    assert two.client().login(email, password).status == 401


def test_chat_history_continues_across_instances(
    pair: tuple[Server, Server], fake: FakeProvider
) -> None:
    """A visitor's next question carries the history made on the other instance; reset clears it."""
    one, two = pair
    visitor = one.client()
    first = chat_lines(visitor.post("/deepseek_chat", {"message": "first question"}))
    assert "".join(line.get("text", "") for line in first) == echo_text("first question")
    elsewhere = copy_cookies(visitor, two.client())
    chat_lines(elsewhere.post("/deepseek_chat", {"message": "second question"}))
    assert fake.wait_requests(2)[1].turns() == [
        ("system", SYSTEM),
        ("user", "first question"),
        ("assistant", echo_text("first question")),
        ("user", "second question"),
    ]
    assert elsewhere.post("/reset_chat", {}).status == 200
    chat_lines(visitor.post("/deepseek_chat", {"message": "third question"}))
    assert fake.wait_requests(3)[2].turns() == [("system", SYSTEM), ("user", "third question")]


###############################################################################
# systemd units
###############################################################################


def unit_settings(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every setting in a unit file, in order."""
    section, found = "", []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def unit_value(path: Path, key: str) -> str:
    """The last value of a [Service] key."""
    values = [v for s, k, v in unit_settings(path) if s == "Service" and k == key]
    assert values, f"{path.name} has no {key}="
    return values[-1]


def mebibytes(value: str) -> int:
    """A systemd memory size with an M or G suffix, in MiB."""
    match = re.fullmatch(r"(\d+)([MG])", value)
    assert match, f"memory sizes here are written as <n>M or <n>G, not {value!r}"
    return int(match.group(1)) * (1024 if match.group(2) == "G" else 1)


def env_file(path: Path) -> dict[str, str]:
    """The KEY=value lines of a systemd EnvironmentFile."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _analyze(root: Path, unit: str) -> str:
    """systemd-analyze verify of a unit inside a temporary root: every message it printed."""
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", unit],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return (done.stdout + done.stderr).strip() + ("" if done.returncode == 0 else " [failed]")


def _exec_paths(unit_text: str) -> set[str]:
    """The programs a unit's Exec*= lines run."""
    paths = set()
    for match in re.finditer(r"(?m)^Exec\w*=[-@:+!]*(\S+)", unit_text):
        paths.add(match.group(1))
    return paths


@pytest.fixture
def systemd_root() -> Iterator[Path]:
    """A throwaway filesystem root holding systemd's own units, for `verify --root`."""
    analyze = find_binary("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; the unit files cannot be verified here")
    root = Path(tempfile.mkdtemp(prefix="cc-systemd-root-"))
    try:
        for system in ("/usr/lib/systemd/system", "/lib/systemd/system"):
            target = root / system.lstrip("/")
            if Path(system).is_dir() and not target.exists():
                shutil.copytree(system, target, symlinks=True)
        (root / "etc/systemd/system").mkdir(parents=True)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _install(root: Path, relative: str, text: str) -> None:
    """Write a unit (or drop-in) into the root's /etc/systemd/system, with stub programs."""
    target = root / "etc/systemd/system" / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    for program in _exec_paths(text):
        stub = root / program.lstrip("/")
        if not stub.exists():
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)


def test_units_pass_systemd_analyze_verify(systemd_root: Path) -> None:
    """cloudchat.service and cloudchat@.service verify without a single message.

    The root is a temporary directory holding systemd's units and empty executables at the
    paths the unit runs (/opt/cloudchat/venv/bin/python, /usr/bin/env): outside a prepared
    box those do not exist and verify would only report that.
    """
    for name, instance in (("cloudchat.service", None), ("cloudchat@.service", "5001")):
        _install(systemd_root, name, (UNITS / name).read_text())
        unit = name.replace("@", f"@{instance}") if instance else name
        assert _analyze(systemd_root, unit) == "", name
    # The check has teeth: a misspelt key is reported.
    broken = (UNITS / "cloudchat.service").read_text().replace("MemoryMax=", "MemoryMaxx=")
    _install(systemd_root, "cloudchat.service", broken)
    assert "Unknown key" in _analyze(systemd_root, "cloudchat.service")


def test_drop_ins_pass_systemd_analyze_verify(systemd_root: Path) -> None:
    """Each drop-in is read from where deploy/README.md installs it and adds no message.

    The base unit is the distribution's where the package is installed (its programs
    stubbed in the root), else a one-line stand-in. Whatever verify says about the base unit
    itself (it varies with the distribution) must be all it says with the drop-in as well.
    """
    for base in DROP_INS:
        shipped = (UNITS / f"{base}.d" / "cloudchat.conf").read_text()
        installed = Path("/usr/lib/systemd/system") / base
        text = installed.read_text() if installed.exists() else "[Service]\nExecStart=/bin/true\n"
        unit = base.replace("@", "@16-main")
        _install(systemd_root, base, text)
        alone = _analyze(systemd_root, unit)
        _install(systemd_root, f"{base}.d/cloudchat.conf", shipped)
        assert _analyze(systemd_root, unit) == alone, base
        _install(systemd_root, f"{base}.d/cloudchat.conf", shipped + "MemoryMaxx=1M\n")
        assert f"{base}.d/cloudchat.conf" in _analyze(systemd_root, unit), base


def test_template_unit_is_the_single_unit_with_the_port_from_the_instance() -> None:
    """cloudchat@.service differs from cloudchat.service only where the instance name matters."""
    single = unit_settings(UNITS / "cloudchat.service")
    template = unit_settings(UNITS / "cloudchat@.service")
    differ = {"Description", "ExecStart", "SyslogIdentifier"}
    assert [s for s in single if s[1] not in differ] == [s for s in template if s[1] not in differ]
    assert unit_value(UNITS / "cloudchat@.service", "ExecStart") == (
        "/usr/bin/env PORT=%i " + unit_value(UNITS / "cloudchat.service", "ExecStart")
    )


def test_unit_runs_unprivileged_capped_and_sandboxed() -> None:
    """The service user, limits and sandbox the deployment promises."""
    unit = UNITS / "cloudchat.service"
    settings = {k: v for s, k, v in unit_settings(unit) if s == "Service"}
    assert settings["User"] == settings["Group"] == "cloudchat"
    assert settings["EnvironmentFile"] == "/etc/cloudchat/cloudchat.env"
    assert settings["Restart"] == "on-failure"
    assert settings["ExecStartPre"].endswith("cloudchat.py initdb")
    assert mebibytes(settings["MemoryHigh"]) < mebibytes(settings["MemoryMax"])
    assert int(settings["OOMScoreAdjust"]) > 0
    assert int(settings["LimitNOFILE"]) >= 4096  # 500 streams x 2 sockets, pools, logs
    # SIGTERM: requests finish within the grace, then mails get as long again.
    grace = float(env_file(DEPLOY / "cloudchat.env")["SHUTDOWN_GRACE_SECONDS"])
    assert int(settings["TimeoutStopSec"]) > 2 * grace
    for key, value in {
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
    }.items():
        assert settings.get(key) == value, key
    assert "@system-service" in [v for s, k, v in unit_settings(unit) if k == "SystemCallFilter"]
    assert "ReadWritePaths" not in settings  # the app writes no file


def test_production_env_file_starts_in_production_mode() -> None:
    """deploy/cloudchat.env, its CHANGE_ME values filled in, passes every production check
    and keeps the app on loopback; unedited, it is refused, naming each placeholder."""
    import cloudchat

    shipped = env_file(DEPLOY / "cloudchat.env")
    with pytest.raises(cloudchat.UnsafeConfigError) as refused:
        cloudchat.Config.from_env(shipped)
    for name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "SMTP_PASS", "DEEPSEEK_API_KEY"):
        assert f"{name} still holds a CHANGE_ME placeholder" in str(refused.value)
    edited = {name: value.replace("CHANGE_ME", "filled-in") for name, value in shipped.items()}
    cfg = cloudchat.Config.from_env(edited)
    assert cfg.production and cloudchat.production_problems(cfg) == []
    assert cfg.host == "127.0.0.1"
    assert cfg.cookie_secure
    assert ":6432/" in cfg.database_url  # through PgBouncer
    assert cfg.redis_url.startswith("redis://:") and "@127.0.0.1:6379/" in cfg.redis_url


###############################################################################
# Redis, PostgreSQL, PgBouncer and nginx settings, read by the real programs
###############################################################################


def test_redis_fragment_is_read_by_redis_server() -> None:
    """redis-server takes the fragment: 64 MiB, noeviction, no persistence, loopback only."""
    binary = find_binary("redis-server")
    if binary is None:
        unavailable("redis-server is not installed")
    assert binary is not None
    import redis

    workdir = Path(tempfile.mkdtemp(prefix="cc-redis-"))
    port = free_port()
    (workdir / "redis.conf").write_text(
        f"include {DEPLOY / 'redis' / 'cloudchat.conf'}\n"
        f'port {port}\ndir {workdir}\ndaemonize no\nlogfile ""\n'
    )
    process = Process("redis", [binary, str(workdir / "redis.conf")], workdir, signal.SIGTERM)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True)
    try:
        process.start(port)
        config = client.config_get("*")
        assert config["maxmemory"] == str(64 * 1024 * 1024)
        assert config["maxmemory-policy"] == "noeviction"
        assert config["save"] == "" and config["appendonly"] == "no"
        assert set(config["bind"].replace("-", "").split()) <= {"127.0.0.1", "::1"}
        assert config["protected-mode"] == "yes"
    finally:
        client.close()
        process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def postgres_setting(binary: str, datadir: Path, name: str) -> str:
    """A setting as the PostgreSQL server computes it from the configuration (postgres -C)."""
    user = unprivileged_user()
    prefix = ["runuser", "-u", user[0], "--"] if user is not None else []
    done = subprocess.run(
        [*prefix, binary, "-D", str(datadir), "-C", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def pg_conf() -> dict[str, str]:
    """deploy/postgresql/cloudchat.conf as name -> value."""
    values = {}
    for line in (DEPLOY / "postgresql" / "cloudchat.conf").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.split("#")[0].strip().strip("'")
    return values


def pgbouncer_ini() -> dict[str, str]:
    """The [pgbouncer] settings of the shipped pgbouncer.ini."""
    section, values = "", {}
    for line in (DEPLOY / "pgbouncer" / "pgbouncer.ini").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith((";", "#")) and section == "pgbouncer":
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_postgresql_settings_are_accepted_by_the_server() -> None:
    """postgres -C reads the shipped file without error and computes the intended values."""
    binary = find_postgres()
    if binary is None:
        unavailable("the PostgreSQL server binary is not installed")
    assert binary is not None
    datadir = private_dir("cc-pgconf-")
    try:
        # A copy, so that the unprivileged user can read it wherever the checkout lives.
        shutil.copy(DEPLOY / "postgresql" / "cloudchat.conf", datadir / "cloudchat.conf")
        (datadir / "postgresql.conf").write_text("include 'cloudchat.conf'\n")
        user = unprivileged_user()
        if user is not None:
            for name in ("postgresql.conf", "cloudchat.conf"):
                os.chown(datadir / name, user[1], user[2])
        assert postgres_setting(binary, datadir, "max_connections") == "25"
        assert postgres_setting(binary, datadir, "shared_buffers") == str(64 * 1024 // 8)
        assert postgres_setting(binary, datadir, "work_mem") == str(4 * 1024)
        assert postgres_setting(binary, datadir, "listen_addresses") == "localhost"
    finally:
        shutil.rmtree(datadir, ignore_errors=True)


def test_pgbouncer_pool_fits_postgresql() -> None:
    """Transaction mode, pool 10, loopback; PostgreSQL has room for the pool and superusers."""
    ini, pg_values = pgbouncer_ini(), pg_conf()
    assert ini["pool_mode"] == "transaction"
    assert ini["default_pool_size"] == "10"
    assert (ini["listen_addr"], ini["listen_port"]) == ("127.0.0.1", "6432")
    assert ini["auth_type"] == "scram-sha-256"
    room = int(pg_values["max_connections"]) - int(pg_values["superuser_reserved_connections"])
    assert int(ini["default_pool_size"]) <= int(ini["max_db_connections"]) < room
    app = env_file(DEPLOY / "cloudchat.env")
    assert int(app["DB_POOL_SIZE"]) <= int(ini["default_pool_size"])


def test_site_conf_passes_nginx_config_test(nginx_bin: str) -> None:
    """The example TLS site, with the snippets and a throwaway certificate, passes nginx -t."""
    openssl = find_binary("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed; no certificate for the TLS example")
    workdir = private_dir("cc-site-")
    try:
        done = subprocess.run(
            [
                *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-subj", "/CN=example.com", "-keyout", f"{workdir}/key.pem"),
                *("-out", f"{workdir}/cert.pem"),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        (workdir / "cloudchat-upstream.conf").write_text(upstream_conf([5000]))
        shutil.copy(NGINX_DIR / "cloudchat-location.conf", workdir)
        site = (NGINX_DIR / "cloudchat-site.conf").read_text()
        for shipped, local in {
            "/etc/nginx/snippets/": f"{workdir}/",
            "/etc/letsencrypt/live/example.com/fullchain.pem": f"{workdir}/cert.pem",
            "/etc/letsencrypt/live/example.com/privkey.pem": f"{workdir}/key.pem",
            "/var/log/nginx/": f"{workdir}/",
        }.items():
            assert shipped in site, shipped
            site = site.replace(shipped, local)
        (workdir / "site.conf").write_text(site)
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_main_conf(workdir, f"    include {workdir}/site.conf;"))
        # -t parses, loads the certificate and opens the logs; it binds no port.
        tested = subprocess.run(
            [
                *(nginx_bin, "-t", "-e", f"{workdir}/error.log", "-p", str(workdir)),
                *("-c", str(conf), "-g", f"pid {workdir}/nginx.pid;"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert tested.returncode == 0, tested.stderr
        assert "[warn]" not in tested.stderr and "[emerg]" not in tested.stderr, tested.stderr
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


###############################################################################
# The memory budget
###############################################################################


def budget_table() -> tuple[dict[str, tuple[int, str]], int]:
    """README.md's budget: component -> (cap in MiB, file that sets it), and what is left."""
    text = (DEPLOY.parent / "README.md").read_text()
    rows = {}
    for match in re.finditer(r"(?m)^\| (\w[\w ]*?) \| ~\d+ MiB \| (\d+) MiB \| `([^`]+)`", text):
        rows[match.group(1)] = (int(match.group(2)), match.group(3))
    left = re.search(r"(?m)^\| OS and the rest \| ~\d+ MiB \| (\d+) MiB left \|", text)
    assert left, "README.md has no 'OS and the rest' row"
    return rows, int(left.group(1))


def test_memory_caps_match_the_budget_and_fit_one_gigabyte() -> None:
    """Every cap in the README's table is the MemoryMax its file sets; they fit in 960 MiB."""
    table, left = budget_table()
    files = {
        "CloudChat": UNITS / "cloudchat.service",
        "PostgreSQL": UNITS / "postgresql@.service.d" / "cloudchat.conf",
        "Redis": UNITS / "redis-server.service.d" / "cloudchat.conf",
        "PgBouncer": UNITS / "pgbouncer.service.d" / "cloudchat.conf",
        "nginx": UNITS / "nginx.service.d" / "cloudchat.conf",
    }
    assert set(table) == set(files), table
    for name, path in files.items():
        cap, where = table[name]
        assert cap == mebibytes(unit_value(path, "MemoryMax")), name
        assert mebibytes(unit_value(path, "MemoryHigh")) < cap, name
        assert where == str(path.relative_to(DEPLOY.parent)), name
    # A "1 GB" VPS has about 960 MiB of MemTotal; the caps leave the rest to the system.
    assert sum(cap for cap, _ in table.values()) + left == 960
    assert left >= 200
