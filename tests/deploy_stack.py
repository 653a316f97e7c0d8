"""Real nginx, PgBouncer and Redis started from the files in deploy/, for tests/test_deploy.py.

Each process runs on loopback from a private temporary directory, with only what a test
cannot avoid templated: listening ports, upstream addresses, file paths and the test
database's name. nginx includes the shipped location block unchanged; PgBouncer runs the
shipped pgbouncer.ini with a handful of values replaced (and checked to exist there).
Processes are stopped by their PID, politely first, then for good.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.helpers import ROOT, free_port

DEPLOY = ROOT / "deploy"
NGINX_DIR = DEPLOY / "nginx"
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def find_binary(name: str) -> str | None:
    """The path of a program on PATH or in the sbin directories, or None."""
    return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


def find_postgres() -> str | None:
    """The PostgreSQL server binary (Debian keeps it out of PATH), or None."""
    pg_config = find_binary("pg_config")
    if pg_config:
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidate = Path(done.stdout.strip()) / "postgres"
        if done.returncode == 0 and candidate.is_file():
            return str(candidate)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return str(found[-1]) if found else find_binary("postgres")


def unprivileged_user() -> tuple[str, int, int, str] | None:
    """(user, uid, gid, group) to drop to when running as root, else None."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("nobody")
    return entry.pw_name, entry.pw_uid, entry.pw_gid, grp.getgrgid(entry.pw_gid).gr_name


def private_dir(prefix: str) -> Path:
    """A fresh temporary directory that the unprivileged user (when root) owns.

    Not under pytest's tmp_path: /tmp/pytest-of-root is closed to other users.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    user = unprivileged_user()
    if user is not None:
        os.chown(path, user[1], user[2])
    return path


def port_open(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Process:
    """A foreground daemon started by a test, its output in a file, stopped by PID."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path, stop_signal: int) -> None:
        """Remember how to start it; nothing runs yet."""
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        self.stop_signal = stop_signal
        self.output = workdir / f"{name}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int, env: Mapping[str, str] | None = None) -> None:
        """Start it and poll until it accepts connections on the port (or fail with its log)."""
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=str(self.workdir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while not port_open(port):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            if time.monotonic() >= deadline:
                self.stop()
                raise AssertionError(f"{self.name} not listening on {port}:\n{self.log_text()}")
            time.sleep(0.02)

    def log_text(self) -> str:
        """What the process wrote so far."""
        try:
            return self.output.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Send the stop signal to the PID, wait with a deadline, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)


def upstream_conf(ports: Sequence[int]) -> str:
    """The shipped upstream block with its server lines replaced by these loopback ports."""
    shipped = (NGINX_DIR / "cloudchat-upstream.conf").read_text()
    servers = "".join(
        f"    server 127.0.0.1:{port} max_fails=3 fail_timeout=10s;\n" for port in ports
    )
    kept, count = re.subn(r"(?m)^\s*server\s+[^;]+;[^\n]*\n", "", shipped)
    assert count >= 1, "deploy/nginx/cloudchat-upstream.conf lists no server"
    templated, found = re.subn(r"(upstream cloudchat \{\n)", lambda m: m.group(1) + servers, kept)
    assert found == 1, "deploy/nginx/cloudchat-upstream.conf has no `upstream cloudchat {`"
    return templated


def nginx_main_conf(workdir: Path, http_body: str) -> str:
    """A minimal top-level nginx.conf whose temporary files and logs stay in workdir."""
    user = unprivileged_user()
    lines = []
    if user is not None:
        # Workers drop to nobody as they would to www-data; nginx chowns its temp dirs.
        lines.append(f"user {user[0]} {user[3]};")
    lines += [
        "worker_processes 1;",
        "events { worker_connections 1024; }",
        "http {",
        f"    access_log {workdir}/access.log;",
        *(
            f"    {kind}_temp_path {workdir}/{kind}_temp;"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        ),
        http_body,
        "}",
    ]
    return "\n".join(lines) + "\n"


class Nginx:
    """nginx on 127.0.0.1:port with the shipped location block in front of some instances."""

    def __init__(self, binary: str, upstream_ports: Sequence[int]) -> None:
        """Write the configuration: a templated upstream and the shipped location, unchanged."""
        self.workdir = private_dir("cc-nginx-")
        self.workdir.chmod(0o755)  # workers (nobody) create body temp files inside
        self.port = free_port()
        (self.workdir / "cloudchat-upstream.conf").write_text(upstream_conf(upstream_ports))
        server = (
            # A careless site around the shipped block: gzip for every type and a cache for
            # every answer, keyed without the cookie. The block must switch both off for itself.
            "    gzip on;\n"
            "    gzip_types *;\n"
            "    gzip_min_length 1;\n"
            f"    proxy_cache_path {self.workdir}/cache keys_zone=careless:1m;\n"
            "    proxy_cache careless;\n"
            "    proxy_cache_valid any 10m;\n"
            "    proxy_ignore_headers Cache-Control Expires Set-Cookie;\n"
            f"    include {self.workdir}/cloudchat-upstream.conf;\n"
            "    server {\n"
            f"        listen 127.0.0.1:{self.port};\n"
            "        server_name localhost;\n"
            f"        include {NGINX_DIR}/cloudchat-location.conf;\n"
            "    }"
        )
        self.conf = self.workdir / "nginx.conf"
        self.conf.write_text(nginx_main_conf(self.workdir, server))
        self.process = Process(
            "nginx",
            [
                binary,
                "-e",
                str(self.workdir / "error.log"),
                "-p",
                str(self.workdir),
                "-c",
                str(self.conf),
                "-g",
                f"daemon off; master_process on; pid {self.workdir}/nginx.pid;"
                f" error_log {self.workdir}/error.log info;",
            ],
            self.workdir,
            signal.SIGTERM,
        )

    def start(self) -> Nginx:
        """Start nginx and wait until it listens."""
        self.process.start(self.port)
        return self

    def error_log(self) -> str:
        """nginx's error log so far."""
        path = self.workdir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop nginx by its PID and remove its directory."""
        self.process.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def template_ini(shipped: str, databases: Mapping[str, str], settings: Mapping[str, str]) -> str:
    """Replace [databases] entries and [pgbouncer] settings; each must exist in the file."""
    section = ""
    seen: set[str] = set()
    out = []
    for line in shipped.splitlines():
        stripped = line.strip()
        header = re.fullmatch(r"\[(\w+)\]", stripped)
        if header:
            section = header.group(1)
        match = re.match(r"([A-Za-z_][\w.]*)\s*=", stripped)
        if match and not stripped.startswith((";", "#")):
            key = match.group(1)
            table = databases if section == "databases" else settings
            if section in ("databases", "pgbouncer") and key in table:
                line = f"{key} = {table[key]}"
                seen.add(f"{section}.{key}")
        out.append(line)
    wanted = {f"databases.{k}" for k in databases} | {f"pgbouncer.{k}" for k in settings}
    missing = wanted - seen
    assert not missing, f"deploy/pgbouncer/pgbouncer.ini lacks {sorted(missing)}"
    return "\n".join(out) + "\n"


class PgBouncer:
    """PgBouncer from the shipped pgbouncer.ini: port, auth file and database templated."""

    def __init__(
        self, binary: str, pg_port: int, dbname: str, userlist: str, db_alias: str = "cloudchat"
    ) -> None:
        """Write the templated ini and the auth file into a private directory."""
        self.workdir = private_dir("cc-pgbouncer-")
        self.port = free_port()
        auth_file = self.workdir / "userlist.txt"
        auth_file.write_text(userlist)
        shipped = (DEPLOY / "pgbouncer" / "pgbouncer.ini").read_text()
        ini = template_ini(
            shipped,
            {db_alias: f"host=127.0.0.1 port={pg_port} dbname={dbname}"},
            {"listen_port": str(self.port), "auth_file": str(auth_file)},
        )
        self.ini = self.workdir / "pgbouncer.ini"
        self.ini.write_text(ini)
        user = unprivileged_user()
        if user is not None:
            for path in (auth_file, self.ini):
                os.chown(path, user[1], user[2])
            auth_file.chmod(0o600)
        # PgBouncer refuses to run as root; -u drops to the user (it does so as root only).
        argv = [binary, *(("-u", user[0]) if user is not None else ()), str(self.ini)]
        self.process = Process("pgbouncer", argv, self.workdir, signal.SIGTERM)

    def start(self) -> PgBouncer:
        """Start PgBouncer in the foreground and wait until it listens."""
        self.process.start(self.port)
        return self

    def stop(self) -> None:
        """Stop PgBouncer by its PID (immediate shutdown) and remove its directory."""
        self.process.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
