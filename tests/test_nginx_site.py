"""The shipped nginx site (deploy/nginx/cloudchat-site.conf), run by real nginx on loopback.

Only what a test cannot avoid is templated: the listen addresses, the snippet, certificate,
log and web-root paths, and the upstream's server line (a real cloudchat server). Everything
else runs as shipped: the log_format, the HSTS header, the request-id map, the redirect.
Over HTTPS (a throwaway certificate for localhost), the test proves that HSTS covers
subdomains, that the access log keeps paths but never the tokens that mailed links carry,
and that one request id, a UUID, names a request in the access log, the answer and the
app's log.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import ssl
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ServerFactory, unavailable
from tests.deploy_stack import (
    NGINX_DIR,
    Process,
    find_binary,
    nginx_main_conf,
    private_dir,
    upstream_conf,
)
from tests.helpers import REQUEST_TIMEOUT, Server, free_port, strong_password, wait_until

# Where the site and the location snippet are read from: the shipped files. (The upstream
# snippet comes through deploy_stack.upstream_conf, which reads deploy_stack.NGINX_DIR.)
SITE_DIR = NGINX_DIR
HSTS = "max-age=31536000; includeSubDomains"
SECRETS = ("SECRET-TOKEN-123", "SECRET-TOKEN-456", "SECRET-TOKEN-789")
# nginx 1.25.1 deprecated `listen ... http2` (a warning); older ones need it there.
HTTP2_DIRECTIVE_SINCE = (1, 25, 1)
ACME_TOKEN = "acme-probe"
LOG_WAIT = 5.0


@dataclass
class Site:
    """The running site: its ports, files and the cloudchat server behind it."""

    https_port: int
    http_port: int
    access_log: Path
    cert: Path
    app: Server

    def access_text(self) -> str:
        """The site's access log so far."""
        return self.access_log.read_text(errors="replace") if self.access_log.exists() else ""


@dataclass
class Answer:
    """A finished answer from nginx."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def __repr__(self) -> str:
        """Status, headers and a prefix of the body, for assertion messages."""
        return f"<Answer {self.status} {dict(self.headers)} {self.body[:300]!r}>"


###############################################################################
# Templating and starting the site
###############################################################################


def nginx_version(binary: str) -> tuple[int, ...]:
    """The version `nginx -v` reports, as a tuple of numbers."""
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=30, check=False)
    match = re.search(r"nginx/(\d+(?:\.\d+)*)", done.stderr + done.stdout)
    assert match, done
    return tuple(int(part) for part in match.group(1).split("."))


def swap(text: str, shipped: str, local: str) -> str:
    """Replace every occurrence of a shipped string, which must be in the text."""
    assert shipped in text, f"cloudchat-site.conf no longer has {shipped!r}"
    return text.replace(shipped, local)


def swap_listen(text: str, shipped: str, local: str) -> str:
    """Replace the IPv4 + IPv6 pair of `listen <shipped>;` lines by one loopback line."""
    both = rf"listen {re.escape(shipped)};\n[ \t]*listen \[::\]:{re.escape(shipped)};\n"
    pattern = rf"(?m)^([ \t]*){both}"
    templated, count = re.subn(pattern, lambda m: f"{m.group(1)}listen {local};\n", text)
    assert count == 1, f"cloudchat-site.conf no longer has `listen {shipped};` for v4 and v6"
    return templated


def site_conf(
    workdir: Path, https_port: int, http_port: int, cert: Path, key: Path, http2: bool
) -> str:
    """The shipped site with addresses and paths made local, nothing else changed."""
    site = (SITE_DIR / "cloudchat-site.conf").read_text()
    site = swap(
        site,
        "include /etc/nginx/snippets/cloudchat-upstream.conf;",
        f"include {workdir}/cloudchat-upstream.conf;",
    )
    site = swap(
        site,
        "include /etc/nginx/snippets/cloudchat-location.conf;",
        f"include {SITE_DIR}/cloudchat-location.conf;",
    )
    site = swap_listen(site, "80", f"127.0.0.1:{http_port}")
    tls = "ssl http2" if http2 else "ssl"
    site = swap_listen(site, "443 ssl http2", f"127.0.0.1:{https_port} {tls}")
    site = swap(site, "/etc/letsencrypt/live/example.com/fullchain.pem", str(cert))
    site = swap(site, "/etc/letsencrypt/live/example.com/privkey.pem", str(key))
    site = swap(
        site,
        "access_log /var/log/nginx/cloudchat.access.log cloudchat;",
        f"access_log {workdir}/cloudchat.access.log cloudchat;",
    )
    site = swap(site, "root /var/www/html;", f"root {workdir}/www;")
    directives = re.sub(r"#[^\n]*", "", site)
    assert "/etc/" not in directives and "/var/" not in directives, directives
    return site


def make_certificate(openssl: str, workdir: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for localhost (and 127.0.0.1), valid for a day."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    done = subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return cert, key


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    """The nginx binary (CI installs it)."""
    binary = find_binary("nginx")
    if binary is None:
        unavailable("nginx is not installed (apt-get install nginx); the site test needs it")
    assert binary is not None
    return binary


@pytest.fixture(scope="module")
def openssl_bin() -> str:
    """The openssl binary, for the throwaway certificate."""
    binary = find_binary("openssl")
    if binary is None:
        unavailable("openssl is not installed; the site test needs a certificate")
    assert binary is not None
    return binary


@pytest.fixture
def site(nginx_bin: str, openssl_bin: str, make_server: ServerFactory) -> Iterator[Site]:
    """The shipped site in front of one embedded cloudchat server; stopped by PID afterwards."""
    app = make_server.start("embedded")
    workdir = private_dir("cc-site-")
    workdir.chmod(0o755)  # workers (nobody when root) read the web root and write temp files
    process: Process | None = None
    try:
        cert, key = make_certificate(openssl_bin, workdir)
        challenge = workdir / "www" / ".well-known" / "acme-challenge"
        challenge.mkdir(parents=True)
        for path in (workdir / "www", challenge.parent, challenge):
            path.chmod(0o755)
        (challenge / ACME_TOKEN).write_text("acme-answer\n")
        (challenge / ACME_TOKEN).chmod(0o644)
        (workdir / "cloudchat-upstream.conf").write_text(upstream_conf([app.port]))
        https_port, http_port = free_port(), free_port()
        while http_port == https_port:
            http_port = free_port()
        http2 = nginx_version(nginx_bin) < HTTP2_DIRECTIVE_SINCE
        (workdir / "site.conf").write_text(
            site_conf(workdir, https_port, http_port, cert, key, http2)
        )
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_main_conf(workdir, f"    include {workdir}/site.conf;"))
        process = Process(
            "nginx",
            [
                *(nginx_bin, "-e", str(workdir / "error.log"), "-p", str(workdir)),
                *("-c", str(conf)),
                *("-g", f"daemon off; master_process on; pid {workdir}/nginx.pid;"),
            ],
            workdir,
            signal.SIGTERM,
        )
        process.start(https_port)
        yield Site(https_port, http_port, workdir / "cloudchat.access.log", cert, app)
    finally:
        if process is not None:
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


###############################################################################
# Clients
###############################################################################


def https(
    site: Site,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """One request over TLS to https://localhost:<port>, the certificate verified."""
    context = ssl.create_default_context(cafile=str(site.cert))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    conn = http.client.HTTPSConnection(
        "localhost", site.https_port, context=context, timeout=REQUEST_TIMEOUT
    )
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        raw = conn.getresponse()
        return Answer(raw.status, raw.msg, raw.read())
    finally:
        conn.close()


def plain(site: Site, path: str, headers: Mapping[str, str] | None = None) -> Answer:
    """One GET over plain HTTP to the site's port-80 server block."""
    conn = http.client.HTTPConnection("127.0.0.1", site.http_port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        raw = conn.getresponse()
        return Answer(raw.status, raw.msg, raw.read())
    finally:
        conn.close()


def logged(site: Site, pattern: str) -> re.Match[str] | None:
    """The first access-log line matching the pattern, or None."""
    return re.search(pattern, site.access_text(), re.MULTILINE)


###############################################################################
# The site
###############################################################################


def test_https_answers_carry_hsts_with_subdomains(site: Site) -> None:
    """/cloudchat/test answers 200 over TLS with HSTS for subdomains; nginx's 404s carry it too."""
    answer = https(site, "GET", "/cloudchat/test")
    assert answer.status == 200, answer
    assert answer.headers.get_all("Strict-Transport-Security") == [HSTS], answer
    missing = https(site, "GET", "/no-such-page")
    assert missing.status == 404, missing
    assert missing.headers.get("Strict-Transport-Security") == HSTS, missing


def test_access_log_has_paths_but_never_mailed_tokens(site: Site) -> None:
    """The reset and verify links' tokens stay out of the access log; their paths are in it."""
    reset_link = https(site, "GET", f"/reset_password?token={SECRETS[0]}")
    verify_link = https(site, "GET", f"/verify_email?token={SECRETS[1]}")
    for answer in (reset_link, verify_link):
        assert answer.status == 404, answer  # no front end in the test's web root
    reset = https(
        site,
        "POST",
        f"/cloudchat/auth/password/reset?token={SECRETS[2]}",
        body=json.dumps({"token": SECRETS[2], "password": strong_password()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert reset.status == 400, reset
    assert json.loads(reset.body)["code"] == "invalid_token", reset
    wait_until(
        lambda: all(
            logged(site, rf'"{method} {path}[ ?]')
            for method, path in (
                ("GET", "/reset_password"),
                ("GET", "/verify_email"),
                ("POST", "/cloudchat/auth/password/reset"),
            )
        ),
        LOG_WAIT,
        what="the three requests in the access log",
    )
    text = site.access_text()
    for secret in SECRETS:
        assert secret not in text, text
    assert "token=" not in text, text
    assert '"GET /reset_password HTTP/1.1" 404 ' in text, text
    assert '"GET /verify_email HTTP/1.1" 404 ' in text, text
    assert '"POST /cloudchat/auth/password/reset HTTP/1.1" 400 ' in text, text


def test_one_uuid_request_id_in_access_log_answer_and_app_log(site: Site) -> None:
    """The access log's rid= is a dashed UUID, the X-Request-ID, the body's id and the app's."""
    answer = https(site, "GET", "/cloudchat/test")
    assert answer.status == 200, answer
    line = wait_until(
        lambda: logged(site, r'^.*"GET /cloudchat/test HTTP/[\d.]+" 200 \d+ rid=(\S+) .*$'),
        LOG_WAIT,
        what="the /cloudchat/test line in the access log",
    )
    rid = line.group(1)
    assert len(rid) == 36 and str(uuid.UUID(rid)) == rid, line.group(0)
    assert answer.headers.get("X-Request-ID") == rid, (line.group(0), answer)
    assert json.loads(answer.body)["request_id"] == rid, (line.group(0), answer)
    app_line = re.compile(rf"GET /test 200 \S+ rid={re.escape(rid)}$", re.MULTILINE)
    wait_until(
        lambda: app_line.search(site.app.log_text()),
        LOG_WAIT,
        what=f"the app's log line for request {rid}",
    )


def test_plain_http_redirects_to_https_except_acme_challenges(site: Site) -> None:
    """Port 80 answers 301 to the same URI over HTTPS; certbot's challenge files stay on HTTP."""
    moved = plain(site, "/anything?x=1", headers={"Host": "example.com"})
    assert moved.status == 301, moved
    assert moved.headers.get("Location") == "https://example.com/anything?x=1", moved
    challenge = plain(site, f"/.well-known/acme-challenge/{ACME_TOKEN}")
    assert challenge.status == 200, challenge
    assert challenge.body == b"acme-answer\n", challenge
