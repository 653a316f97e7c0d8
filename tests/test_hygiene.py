"""Issue 13 points 7 and 8: logs that cannot be forged or leak credentials; check-config."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import cloudchat
from tests.conftest import ServerFactory
from tests.helpers import Client, base_env, free_port, logged, run_cli, wait_until


def test_check_config_prints_masked_settings_and_exits_0(tmp_path: Path) -> None:
    """Point 8: check-config shows the effective settings, passwords masked; 0 when fine."""
    env = {
        **base_env(),
        "CLOUDCHAT_DB_PATH": str(tmp_path / "cc.db"),
        "SMTP_PASS": "smtp-pass-visible-no",
        "DEEPSEEK_API_KEY": "sk-key-visible-no",
    }
    done = run_cli(["check-config"], env, tmp_path)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "port = 0" in done.stdout and "configuration ok" in done.stdout
    assert "smtp-pass-visible-no" not in done.stdout
    assert "sk-key-visible-no" not in done.stdout
    assert "smtp_pass = ***" in done.stdout


def test_check_config_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    """Point 8: every malformed setting at once, each naming its variable; URLs masked."""
    env = {
        **base_env(),
        "CLOUDCHAT_DB_PATH": str(tmp_path / "cc.db"),
        "PORT": "abc",
        "REDIS_URL": "http://user:hidden-pw@example.com/",
        "DATABASE_URL": "mysql://u:db-pw-hidden@db/x",
    }
    done = run_cli(["check-config"], env, tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    problems = [line for line in done.stdout.splitlines() if line.startswith("problem:")]
    for name in ("PORT", "REDIS_URL", "DATABASE_URL"):
        assert any(name in line for line in problems), problems
    assert "hidden-pw" not in done.stdout and "db-pw-hidden" not in done.stdout


def test_version(tmp_path: Path) -> None:
    """Point 8: --version prints the version and exits 0."""
    done = run_cli(["--version"], base_env(), tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == f"cloudchat {cloudchat.__version__}"


def test_busy_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Point 8: a port already taken is one error line and exit 2, no traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        env = {
            **base_env(),
            "PORT": str(taken.getsockname()[1]),
            "CLOUDCHAT_DB_PATH": str(tmp_path / "cc.db"),
        }
        done = run_cli([], env, tmp_path, timeout=20)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "cannot listen on" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("path", "raw"),
    [("/nope%C2%85POST%20/auth/login%20200", "\x85"), ("/nope%E2%80%A8x", "\u2028")],
    ids=["nel", "line-separator"],
)
def test_unicode_line_breaks_in_a_path_are_escaped(
    make_server: ServerFactory, path: str, raw: str
) -> None:
    """Point 7: U+0085 and U+2028 in a path reach the log escaped, never raw."""
    srv = make_server.start("embedded")
    response = Client("127.0.0.1", srv.port).get(path)
    rid = response.header("X-Request-ID")
    line = wait_until(
        lambda: next((x for x in srv.logs if f"rid={rid}" in x), None), 10, what="the log line"
    )
    assert raw not in srv.log_text(), line
    assert ("\\x85" if raw == "\x85" else "\\u2028") in line, line


def test_database_password_never_reaches_the_log(make_server: ServerFactory) -> None:
    """Point 7: a DATABASE_URL that cannot connect, with a password holding an '@': neither
    the password nor its tail after the '@' appears in any log line."""
    port = free_port()
    url = f"postgresql://cc:S3cretHead@TailPiece9@127.0.0.1:{port}/nowhere"
    srv = make_server.start("embedded", {"DATABASE_URL": url})
    for _ in range(2):
        assert srv.client().get("/auth/healthz").status == 503
    login = srv.client().post("/auth/login", {"identifier": "a@example.com", "password": "x" * 9})
    wait_until(lambda: "health check" in srv.log_text(), 10, what="the outage line")
    logged(srv, f"rid={login.header('X-Request-ID')}")
    text = srv.log_text()
    for secret in ("S3cretHead", "TailPiece9", "S3cretHead%40TailPiece9"):
        assert secret not in text, text


def test_development_mail_line_masks_the_address(make_server: ServerFactory) -> None:
    """Point 7: without SMTP the mail is logged, its recipient masked in the text too."""
    srv = make_server.start("embedded")
    email = "someone-unique-42@example.com"
    assert srv.client().register(email, "correct horse battery").status == 201
    line = wait_until(
        lambda: next((x for x in srv.logs if "not sent" in x), None), 10, what="the mail line"
    )
    assert email not in srv.log_text(), line
    assert "s***@example.com" in line


def test_formatter_escapes_and_redacts() -> None:
    """Point 7, in-process: one line per record; URL userinfo and configured secrets out."""
    formatter = cloudchat.RedactingFormatter("%(message)s", ["pa@ss-word-1"])
    record = logging.LogRecord(
        "cloudchat",
        logging.WARNING,
        __file__,
        1,
        "provider said: %s",
        ("bad\nPOST /auth/login 200\u2028 redis://:pw-in-url@h:1/0 and ss-word-1 pa@ss-word-1",),
        None,
    )
    line = formatter.format(record)
    assert "\n" not in line and "\u2028" not in line, line
    assert "pw-in-url" not in line and "ss-word-1" not in line and "pa@ss" not in line, line
    assert "\\x0aPOST /auth/login 200\\u2028" in line, line
