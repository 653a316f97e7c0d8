"""The command line: initdb, --help, the production guard, signals and a side-effect-free import."""

from __future__ import annotations

import signal
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import SETUPS, PgDatabases, ServerFactory
from tests.helpers import (
    CHEAP_ARGON2,
    PYTHON,
    ROOT,
    TEST_SECRET_KEY,
    Server,
    SilentTcpServer,
    base_env,
    free_port,
    random_email,
    run_cli,
    strong_password,
    wait_until,
)


def _run_guarded(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the server expecting it to refuse to start; fail clearly if it serves instead."""
    try:
        return run_cli([], env, cwd, timeout=20)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"cloudchat started instead of refusing: {exc.stdout!r} {exc.stderr!r}")


def _assert_one_line(done: subprocess.CompletedProcess[str], prefix: str, names: str) -> None:
    """Assert exit code 2 and exactly one stderr line with the prefix and a variable name."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(prefix), lines[0]
    assert any(name in lines[0] for name in names.split("|")), lines[0]


def test_help_mentions_initdb(tmp_path: Path) -> None:
    """`cloudchat.py --help` exits 0 and documents initdb."""
    done = run_cli(["--help"], base_env(), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "initdb" in done.stdout + done.stderr


def test_initdb_twice_is_harmless_sqlite(make_server: ServerFactory) -> None:
    """initdb creates the SQLite schema, can run again, and keeps the data."""
    env, workdir = make_server.env("embedded")
    for _ in range(2):
        done = run_cli(["initdb"], env, workdir)
        assert done.returncode == 0, (done.stdout, done.stderr)
    assert Path(env["CLOUDCHAT_DB_PATH"]).exists()
    _assert_initdb_keeps_users(make_server.launch("embedded", env, workdir))


def test_initdb_twice_is_harmless_postgres(make_server: ServerFactory, pg: PgDatabases) -> None:
    """initdb creates the schema in an empty PostgreSQL database, twice, and keeps the data."""
    env, workdir = make_server.env("postgres", {"DATABASE_URL": pg.create(from_template=False)})
    for _ in range(2):
        done = run_cli(["initdb"], env, workdir)
        assert done.returncode == 0, (done.stdout, done.stderr)
    _assert_initdb_keeps_users(make_server.launch("postgres", env, workdir))


def test_concurrent_initdb_on_an_empty_database(
    make_server: ServerFactory, pg: PgDatabases
) -> None:
    """Instances starting together each run initdb: every one succeeds (advisory lock)."""
    import subprocess

    from tests.helpers import CLOUDCHAT, PYTHON

    for _ in range(2):
        env, workdir = make_server.env("postgres", {"DATABASE_URL": pg.create(from_template=False)})
        procs = [
            subprocess.Popen(
                [PYTHON, str(CLOUDCHAT), "initdb"],
                env=env,
                cwd=str(workdir),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        outcomes = [(proc.wait(60), *proc.communicate()) for proc in procs]
        assert all(code == 0 for code, _, _ in outcomes), outcomes


def test_initdb_on_schema_sql_copy(make_server: ServerFactory) -> None:
    """initdb on a database made from schema.sql is a harmless no-op."""
    env, workdir = make_server.env("postgres")
    done = run_cli(["initdb"], env, workdir)
    assert done.returncode == 0, (done.stdout, done.stderr)


def _assert_initdb_keeps_users(srv: Server) -> None:
    """Register a user, run initdb again on the live database, and log in."""
    email, password = random_email(), strong_password()
    client = srv.client()
    assert client.register(email, password).status == 201
    done = run_cli(["initdb"], srv.env, srv.workdir)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert client.login(email, password).status == 200
    assert client.me().status == 200


def _production_env(tmp_path: Path, **changes: str | None) -> dict[str, str]:
    """A production environment that passes the guard, with some variables changed."""
    env = base_env()
    for key in CHEAP_ARGON2:
        env.pop(key)
    env.update(
        CLOUDCHAT_ENV="production",
        COOKIE_SECURE="1",
        FRONTEND_BASE_URL="https://chat.example.com",
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/cc_guard_unused",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        CLOUDCHAT_DB_PATH=str(tmp_path / "unused.db"),
        DEEPSEEK_API_KEY="sk-test-unused",
        SECRET_KEY=TEST_SECRET_KEY,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(free_port()),
    )
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


GUARD_CASES = {
    "cookie-secure-unset": ({"COOKIE_SECURE": None}, "COOKIE_SECURE"),
    "cookie-secure-0": ({"COOKIE_SECURE": "0"}, "COOKIE_SECURE"),
    "debug-reset-token": ({"DEBUG_RETURN_RESET_TOKEN": "1"}, "DEBUG_RETURN_RESET_TOKEN"),
    "no-database-url": ({"DATABASE_URL": None}, "DATABASE_URL"),
    "no-redis": ({"REDIS_URL": None}, "REDIS"),
    "frontend-http": ({"FRONTEND_BASE_URL": "http://chat.example.com"}, "FRONTEND_BASE_URL"),
    "cheap-argon2": ({"ARGON2_TIME_COST": "1", "ARGON2_MEMORY_KIB": "8"}, "ARGON2"),
    "echo-chat-provider": ({"DEEPSEEK_API_KEY": None}, "API_KEY"),
    "public-bind": ({"HOST": "0.0.0.0"}, "HOST"),
    "smtp-in-clear": (
        {"SMTP_HOST": "smtp.example.com", "SMTP_PORT": "587", "SMTP_TLS": "0"},
        "SMTP_TLS",
    ),
    # Issue 13 point 9: addresses read as addresses, and the gaps the review found.
    "bind-0": ({"HOST": "0"}, "HOST"),
    "bind-colon-0": ({"HOST": "::0"}, "HOST"),
    "bind-long-ipv6-zero": ({"HOST": "0:0:0:0:0:0:0:0"}, "HOST"),
    "bind-0-0-0-00": ({"HOST": "0.0.0.00"}, "HOST"),
    "trust-everyone": ({"TRUSTED_PROXIES": "0.0.0.0/0,::/0"}, "TRUSTED_PROXIES"),
    "provider-in-clear": (
        {"DEEPSEEK_BASE_URL": "http://api.deepseek.example"},
        "DEEPSEEK_BASE_URL",
    ),
    "no-smtp-host": ({"SMTP_HOST": None}, "SMTP_HOST"),
    "no-secret-key": ({"SECRET_KEY": None}, "SECRET_KEY"),
    "change-me-left": ({"DEEPSEEK_API_KEY": "CHANGE_ME"}, "DEEPSEEK_API_KEY"),
}


@pytest.mark.parametrize("case", list(GUARD_CASES), ids=list(GUARD_CASES))
def test_production_guard_refuses_to_start(tmp_path: Path, case: str) -> None:
    """Unsafe production settings exit 2 with one `refusing to start` line naming the cause."""
    changes, name = GUARD_CASES[case]
    done = _run_guarded(_production_env(tmp_path, **changes), tmp_path)
    _assert_one_line(done, "cloudchat: refusing to start:", name)


CONFIG_ERRORS = {
    "port-abc": ({"PORT": "abc"}, "PORT"),
    "port-out-of-range": ({"PORT": "70000"}, "PORT"),
    "rate-not-n-per-seconds": ({"RATE_LOGIN_IP": "ten"}, "RATE_LOGIN_IP"),
    "rate-zero-window": ({"RATE_REGISTER_IP": "10/0"}, "RATE_REGISTER_IP"),
    "bad-cidr": ({"TRUSTED_PROXIES": "999.1.1.1/8"}, "TRUSTED_PROXIES"),
    "max-body-not-int": ({"MAX_BODY_BYTES": "lots"}, "MAX_BODY_BYTES"),
    "ttl-not-int": ({"SESSION_TTL_SECONDS": "1 week"}, "SESSION_TTL_SECONDS"),
    "argon2-not-int": ({"ARGON2_TIME_COST": "fast"}, "ARGON2_TIME_COST"),
    "provider-without-key": ({"CHAT_PROVIDER": "openai"}, "OPENAI_API_KEY"),
    "unknown-fallback": (
        {"DEEPSEEK_API_KEY": "k", "CHAT_FALLBACK": "claude"},
        "CHAT_FALLBACK",
    ),
    "base-url-not-http": ({"DEEPSEEK_BASE_URL": "ftp://x"}, "DEEPSEEK_BASE_URL"),
    # Issue 13 point 8: each of these was a traceback, or passed and failed later.
    "redis-url-http": ({"REDIS_URL": "http://x"}, "REDIS_URL"),
    "database-url-mysql": ({"DATABASE_URL": "mysql://u:pw@db/x"}, "DATABASE_URL"),
    "host-unresolvable": ({"HOST": "no-such-host.invalid"}, "HOST"),
    "db-path-missing-folder": ({"CLOUDCHAT_DB_PATH": "/nonexistent-cc/cc.db"}, "CLOUDCHAT_DB_PATH"),
    "smtp-ca-file-missing": ({"SMTP_CA_FILE": "/nonexistent-cc/ca.pem"}, "SMTP_CA_FILE"),
    "secret-key-short": ({"SECRET_KEY": "short"}, "SECRET_KEY"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS), ids=list(CONFIG_ERRORS))
def test_invalid_setting_is_a_configuration_error(tmp_path: Path, case: str) -> None:
    """An invalid value exits 2 with one `configuration error` line naming the variable."""
    changes, name = CONFIG_ERRORS[case]
    env = base_env()
    env["CLOUDCHAT_DB_PATH"] = str(tmp_path / "cc.db")
    env.update(changes)
    done = _run_guarded(env, tmp_path)
    _assert_one_line(done, "cloudchat: configuration error:", name)


def test_production_with_safe_settings_starts(make_server: ServerFactory) -> None:
    """Production with Secure cookies, PostgreSQL and Redis serves, and its cookie is Secure."""
    production = {
        "CLOUDCHAT_ENV": "production",
        "COOKIE_SECURE": "1",
        "FRONTEND_BASE_URL": "https://chat.example.com",
        "DEEPSEEK_API_KEY": "sk-test-unused",
        "SECRET_KEY": TEST_SECRET_KEY,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(free_port()),
        **dict.fromkeys(CHEAP_ARGON2),
    }
    srv = make_server.start("postgres", production)
    client = srv.client()
    assert client.get("/auth/healthz").status == 200
    email, password = random_email(), strong_password()
    assert client.register(email, password).status == 201
    cookie = client.login(email, password).cookie("cc_auth")
    assert cookie is not None and "secure" in cookie[1]


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_with_exit_0(make_server: ServerFactory, setup: str, signum: int) -> None:
    """SIGTERM and SIGINT stop an idle server quickly with exit code 0."""
    srv = make_server.start(setup)
    assert srv.client().get("/test").status == 200
    srv.signal(signum)
    code = srv.wait(5)
    assert code == 0, (code, srv.log_text())
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", srv.port), timeout=2):
        pass


def test_sigterm_lets_a_request_in_flight_finish(make_server: ServerFactory) -> None:
    """A request being served when SIGTERM arrives still gets its answer; then exit 0."""
    hung = SilentTcpServer()
    try:
        srv = make_server.start("embedded", {"REDIS_URL": f"redis://127.0.0.1:{hung.port}/0"})
        before = len(hung.accepted)
        with ThreadPoolExecutor(max_workers=1) as pool:
            # healthz waits on the hung Redis for its timeout: a request that takes a while.
            pending = pool.submit(srv.client().get, "/auth/healthz", timeout=20)
            wait_until(lambda: len(hung.accepted) > before, timeout=10, what="the Redis probe")
            srv.signal(signal.SIGTERM)
            response = pending.result(timeout=20)
        assert response.status == 503, response
        assert response.json()["redis"] is False
        assert srv.wait(10) == 0, srv.log_text()
    finally:
        hung.close()


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    """Importing cloudchat patches nothing, prints nothing and creates no file."""
    env = base_env()
    env["PYTHONPATH"] = str(ROOT)
    code = "import cloudchat, gevent.monkey as m; print(m.is_module_patched('socket'))"
    done = subprocess.run(
        [PYTHON, "-c", code],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert done.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_app_is_a_lazily_created_wsgi_callable(tmp_path: Path) -> None:
    """`cloudchat.app` is there on first access and is callable."""
    env = base_env()
    env["PYTHONPATH"] = str(ROOT)
    env["CLOUDCHAT_DB_PATH"] = str(tmp_path / "cc.db")
    done = subprocess.run(
        [PYTHON, "-c", "import cloudchat; print(callable(cloudchat.app))"],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True"


def test_production_argon2_defaults() -> None:
    """The default Argon2 parameters meet OWASP's minimum (read, not hashed with)."""
    import cloudchat

    cfg = cloudchat.Config.from_env({})
    assert cfg.argon2_memory_kib >= 19456
    assert cfg.argon2_time_cost >= 2
    assert cfg.argon2_parallelism >= 1
    cheap = cloudchat.Config.from_env(dict(CHEAP_ARGON2))
    assert (cheap.argon2_time_cost, cheap.argon2_memory_kib) == (1, 8)


def test_config_is_frozen() -> None:
    """The Config is immutable once built."""
    import cloudchat

    cfg = cloudchat.Config.from_env({})
    with pytest.raises(AttributeError):
        cfg.argon2_time_cost = 1


def test_a_script_start_runs_the_module_from_its_bytecode(tmp_path: Path) -> None:
    """`python cloudchat.py` starts again (same PID) as an import of the module, so that
    the compiler's memory stays behind: the serving process runs `-c`, keeps interpreter
    options such as -X, caches the bytecode, and a read-only copy still starts."""
    copy = tmp_path / "app"
    copy.mkdir()
    (copy / "cloudchat.py").write_bytes((ROOT / "cloudchat.py").read_bytes())
    env = {**base_env(), "PORT": "0", "CLOUDCHAT_DB_PATH": str(tmp_path / "cc.db")}
    del env["PYTHONDONTWRITEBYTECODE"]  # the suite's setting; a deployment writes bytecode
    proc = subprocess.Popen(
        [PYTHON, "-X", "utf8", str(copy / "cloudchat.py")],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "listening on" in line:
                break
        argv = Path(f"/proc/{proc.pid}/cmdline").read_text().split("\0")
        assert argv[1:4] == ["-X", "utf8", "-c"], argv
        assert argv[5:7] == [str(copy), "cloudchat"], argv
        assert list((copy / "__pycache__").glob("cloudchat.*.pyc")), "no bytecode cached"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    (copy / "__pycache__").chmod(0o555)
    copy.chmod(0o555)  # nothing can be written: the import compiles in memory
    try:
        done = subprocess.run(
            [PYTHON, str(copy / "cloudchat.py"), "--version"],
            env=env,
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0 and done.stdout.startswith("cloudchat "), done
    finally:
        copy.chmod(0o755)
        (copy / "__pycache__").chmod(0o755)
