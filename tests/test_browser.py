"""Issue 18: the demo page (GET /, /reset_password, /verify_email) in a real Chromium.

Debian's chromium driven by playwright's sync API: one browser per module, a fresh context
(cookies, localStorage) per visitor. The journeys run against real servers (the embedded
setup, and once behind the shipped nginx location block under /cloudchat/), the loopback
SMTP sink and the fake model provider. Every test also checks the console: no error but
the browser's own "Failed to load resource" line for an expected 401 or 404, no Content
Security Policy violation, no uncaught exception. Each step leaves a screenshot in
$CLOUDCHAT_SCREENSHOTS (default tests/artifacts/screenshots, not committed), named
<test>-<step number>-<step>.png.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import ServerFactory, shared_server, unavailable
from tests.deploy_stack import Nginx, find_binary
from tests.fakeprovider import FakeProvider, Reply
from tests.helpers import (
    HIGH_LIMITS,
    ROOT,
    Server,
    free_port,
    random_email,
    random_hex,
    strong_password,
)
from tests.mailsink import MailSink

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError as exc:  # the browser fixture skips, or fails under CI=true
    PLAYWRIGHT_MISSING: str | None = f"the playwright package is not installed ({exc})"
else:
    PLAYWRIGHT_MISSING = None

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Response

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(os.environ.get("CLOUDCHAT_SCREENSHOTS") or ROOT / "tests/artifacts/screenshots")
WAIT_MS = 10_000  # longest any single browser wait may take
KEY = "sk-test-deepseek-0123"
# A reply streamed line by line, slowly enough that the page shows each line on its own.
LINES = ["First line.\n", "Second line.\n", "Third line.\n", "Last line."]
LINE_DELAY = 0.3
ALLOWED_CONSOLE_ERROR = re.compile(
    r"^Failed to load resource: the server responded with a status of (401|404) "
)
# English texts of the page (its status lines and labels).
SIGNED_OUT = "Not signed in."
REGISTERED = "Account created: log in."
LINK_SENT = "If the account exists, a link is on its way."
PASSWORD_SAVED = "Password saved: log in."
VERIFIED = "Email address confirmed."
LOGGED_OUT = "Logged out."
MFA_PROMPT = "Enter the code from your authenticator app"
THIS_BROWSER = "(this browser)"
RESET_LINK = re.compile(r"(https?://\S+/reset_password\?token=[A-Za-z0-9_\-]+)")
VERIFY_LINK = re.compile(r"(https?://\S+/verify_email\?token=[A-Za-z0-9_\-]+)")
# The boxes (and their text) whose content is wider than the box itself, as "id: px > px".
OVERFLOWING = """() => [...document.querySelectorAll("header, section, #status")]
  .filter((el) => el.offsetParent !== null && el.scrollWidth > el.clientWidth)
  .map((el) => (el.id || el.tagName) + ": " + el.scrollWidth + " > " + el.clientWidth)"""
# The page reports CSP violations to the console, where the test's listener reads them.
CSP_REPORTER = """
document.addEventListener("securitypolicyviolation", (e) => {
  console.error("Content Security Policy violation: " + e.violatedDirective + " " + e.blockedURI);
});
"""
# Records every text the last assistant bubble shows, in order, and whether it was done.
STREAM_RECORDER = """() => {
  window.__seen = [];
  const log = document.getElementById("chat-log");
  const record = () => {
    const all = log.querySelectorAll(".msg.assistant");
    const last = all[all.length - 1];
    if (!last) return;
    const entry = { text: last.textContent, done: last.dataset.done === "1" };
    const prev = window.__seen[window.__seen.length - 1];
    if (!prev || prev.text !== entry.text || prev.done !== entry.done) window.__seen.push(entry);
  };
  new MutationObserver(record).observe(log, {
    childList: true, subtree: true, characterData: true, attributes: true,
  });
}"""


def chat_env(provider: FakeProvider, sink: MailSink) -> dict[str, str | None]:
    """Settings of a server that chats with the fake provider and mails the sink."""
    return {
        **HIGH_LIMITS,
        **sink.env(),
        "RATE_CHAT_VISITOR": "100000/60",
        "RATE_CHAT_IP": "100000/60",
        "RATE_FORGOT_IP": "100000/3600",
        "RATE_FORGOT_IDENTIFIER": "100000/3600",
        "DEEPSEEK_API_KEY": KEY,
        "DEEPSEEK_BASE_URL": provider.url(),
        "CHAT_CONNECT_TIMEOUT": "2",
        "CHAT_READ_TIMEOUT": "5",
    }


# -- the test's own RFC 6238 (SHA-1, 6 digits, 30 s) ---------------------------------------


def totp(secret: str, unix_time: float) -> str:
    """The TOTP code of a base32 secret at a moment (RFC 4226 section 5.3 over RFC 6238)."""
    key = base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))
    mac = hmac.new(key, struct.pack(">Q", int(unix_time // 30)), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    (value,) = struct.unpack(">I", mac[offset : offset + 4])
    return f"{(value & 0x7FFFFFFF) % 10**6:06d}"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium (Debian's) for the module."""
    if PLAYWRIGHT_MISSING:
        unavailable(PLAYWRIGHT_MISSING + "; pip install playwright")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium); browser tests need it")
    expect.set_options(timeout=WAIT_MS)
    driver = sync_playwright().start()
    try:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        driver.stop()


@pytest.fixture(scope="module")
def site(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    provider: FakeProvider,
    sink: MailSink,
) -> Iterator[Server]:
    """An embedded server whose mails link to itself (its port chosen up front), with
    optional email verification, the fake provider and the SMTP sink."""
    port = free_port()
    overrides = {
        **chat_env(provider, sink),
        "PORT": str(port),
        "FRONTEND_BASE_URL": f"http://127.0.0.1:{port}",
        "EMAIL_VERIFICATION": "optional",
    }
    yield from shared_server(request, tmp_path_factory, overrides, "embedded")


@dataclass
class Tab:
    """One visitor: a fresh browser context, its page, and what the page logged."""

    context: BrowserContext
    page: Page
    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


class Browse:
    """Opens visitors for one test, takes its numbered screenshots, checks the console."""

    def __init__(self, browser: Browser, test_name: str) -> None:
        """Remember the browser; old screenshots of this test are removed."""
        self.browser = browser
        self.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
        self.tabs: list[Tab] = []
        self.step = 0
        SHOTS.mkdir(parents=True, exist_ok=True)
        for old in SHOTS.glob(f"{self.name}-*.png"):
            old.unlink()

    def open(self, url: str, **options: Any) -> Tab:
        """A new context (no cookies, no storage) with a page on url, the page's script run."""
        context = self.browser.new_context(**options)
        context.set_default_timeout(WAIT_MS)
        context.add_init_script(CSP_REPORTER)
        page = context.new_page()
        tab = Tab(context, page)
        self.tabs.append(tab)
        page.on("console", lambda msg: self._console(tab, msg))
        page.on("pageerror", lambda err: tab.console.append(f"pageerror: {err}"))
        page.on("request", lambda req: tab.requests.append(req.url))
        goto(page, url)
        return tab

    @staticmethod
    def _console(tab: Tab, msg: ConsoleMessage) -> None:
        """Keep the page's errors and warnings (with where they came from)."""
        if msg.type in ("error", "warning"):
            tab.console.append(f"{msg.type}: {msg.text} @ {msg.location.get('url', '')}")

    def shot(self, tab: Tab, step: str) -> None:
        """Save a screenshot of the whole page as <test>-<NN>-<step>.png."""
        self.step += 1
        path = SHOTS / f"{self.name}-{self.step:02d}-{step}.png"
        tab.page.screenshot(path=str(path), full_page=True, caret="initial", animations="allow")

    def assert_clean(self) -> None:
        """No console error but the expected 401/404 loads, no CSP violation, no exception."""
        problems = []
        for tab in self.tabs:
            for line in tab.console:
                kind, _, text = line.partition(": ")
                expected = kind == "warning" or ALLOWED_CONSOLE_ERROR.match(text)
                if "Content Security Policy" in text or kind == "pageerror" or not expected:
                    problems.append(line)
        assert not problems, "console:\n" + "\n".join(problems)

    def close(self) -> None:
        """Close every context this test opened."""
        for tab in self.tabs:
            tab.context.close()


@pytest.fixture
def browse(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Browse]:
    """The test's visitors, closed afterwards."""
    opened = Browse(browser, request.node.name)
    try:
        yield opened
    finally:
        opened.close()


# -- what a visitor does -------------------------------------------------------------------


def goto(page: Page, url: str) -> Response:
    """Open a URL and wait until the page's first who-am-I round is over."""
    with page.expect_response(lambda r: urlsplit(r.url).path.endswith("/chat/history")):
        response = page.goto(url)
    assert response is not None and response.status == 200, (url, response)
    return response


def reload(page: Page) -> Response:
    """Reload and wait until the page has asked who is signed in and for the history."""
    with page.expect_response(lambda r: urlsplit(r.url).path.endswith("/chat/history")) as got:
        page.reload()
    return got.value


def status(page: Page, text: str, error: bool = False) -> None:
    """Wait for the status line to say text (as an error or not)."""
    expect(page.locator("#status")).to_have_text(text)
    expect(page.locator("#status")).to_have_class("error" if error else "")


def register(page: Page, email: str, password: str, name: str = "") -> None:
    """Create an account with the page's form; the login form gets the address."""
    page.fill("#reg-email", email)
    page.fill("#reg-password", password)
    page.fill("#reg-name", name)
    page.click("#register button[type=submit]")
    status(page, REGISTERED)
    expect(page.locator("#login-id")).to_have_value(email)


def fill_login(page: Page, identifier: str, password: str) -> None:
    """Submit the login form."""
    page.fill("#login-id", identifier)
    page.fill("#login-password", password)
    page.click("#login button[type=submit]")


def signed_in(page: Page, email: str) -> None:
    """Wait until the page shows the account, its sessions and its history."""
    expect(page.locator("#me-info")).to_have_text(re.compile(rf"^Signed in as {re.escape(email)}"))
    expect(page.locator("#signed-in")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#register")).to_be_hidden()
    expect(page.locator("#sessions-list li").first).to_be_visible()


def signed_out(page: Page) -> None:
    """Wait until the page shows nobody signed in."""
    expect(page.locator("#me-info")).to_have_text(SIGNED_OUT)
    expect(page.locator("#signed-in")).to_be_hidden()
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#sessions-list li")).to_have_count(0)


def log_in(page: Page, email: str, password: str) -> None:
    """Log in through the form and wait for the signed-in page."""
    fill_login(page, email, password)
    signed_in(page, email)


def me(tab: Tab, base: str) -> dict[str, Any]:
    """GET /auth/me with the context's cookies."""
    answer = tab.context.request.get(f"{base}/auth/me")
    body = answer.json()
    body["status"] = answer.status
    return body


def mailed_link(sink: MailSink, address: str, subject: str, pattern: re.Pattern[str]) -> str:
    """The link in the first mail to address whose subject starts with subject."""
    found: list[str] = []

    def arrived() -> bool:
        for received in sink.to(address):
            if str(received.message["Subject"]).startswith(subject):
                match = pattern.search(received.text())
                assert match, received.text()
                found.append(match.group(1))
                return True
        return False

    deadline = time.monotonic() + 10
    while not arrived():
        assert time.monotonic() < deadline, f"no {subject!r} mail to {address}"
        sink.wait_for(address, len(sink.to(address)) + 1, timeout=deadline - time.monotonic())
    return found[0]


def chat_streams_line_by_line(browse: Browse, tab: Tab, message: str, by_enter: bool) -> None:
    """Send a message and watch the answer grow line by line until its stream ends."""
    page = tab.page
    page.evaluate(STREAM_RECORDER)
    page.fill("#chat-input", message)
    if by_enter:
        page.press("#chat-input", "Enter")
    else:
        page.click("#chat-form button[type=submit]")
    expect(page.locator("#chat-log .msg.user").last).to_have_text(message)
    assistant = page.locator("#chat-log .msg.assistant").last
    # The first line is there while the rest is still on its way.
    page.wait_for_function(
        """(first) => {
          const all = document.querySelectorAll("#chat-log .msg.assistant");
          const last = all[all.length - 1];
          return last && last.textContent === first && last.dataset.done !== "1";
        }""",
        arg=LINES[0],
    )
    browse.shot(tab, "chat-streaming")
    expect(assistant).to_have_attribute("data-done", "1")
    full = "".join(LINES)
    expect(assistant).to_have_text(full)
    seen = page.evaluate("window.__seen")
    prefixes = ["".join(LINES[: n + 1]) for n in range(len(LINES))]
    partial = [s["text"] for s in seen if not s["done"] and s["text"] in prefixes[:-1]]
    assert len(set(partial)) >= 2, seen
    shown = [s["text"] for s in seen if s["text"] in prefixes]
    assert shown == sorted(shown, key=len) and shown[-1] == full, seen
    assert [s for s in seen if s["done"]][-1]["text"] == full, seen
    browse.shot(tab, "chat-done")


def history_texts(page: Page) -> list[tuple[str, str]]:
    """(role, text) of every bubble in the chat log."""
    pairs = page.eval_on_selector_all(
        "#chat-log .msg",
        "els => els.map(e => [e.classList.contains('user') ? 'user' : 'assistant', e.textContent])",
    )
    return [(role, text) for role, text in pairs]


def reset_through_mail(
    browse: Browse, tab: Tab, sink: MailSink, base: str, email: str, new_password: str
) -> None:
    """Forgot password -> the mailed link -> a new password -> back on the page's start."""
    page = tab.page
    page.fill("#forgot-id", email)
    page.click("#forgot button[type=submit]")
    status(page, LINK_SENT)
    browse.shot(tab, "forgot-sent")
    link = mailed_link(sink, email, "Reset your", RESET_LINK)
    assert link.startswith(f"{base}/reset_password?token="), link
    goto(page, link)
    expect(page.locator("#reset")).to_be_visible()
    expect(page.locator("#verify")).to_be_hidden()
    browse.shot(tab, "reset-form")
    page.fill("#reset-password", new_password)
    page.click("#reset button[type=submit]")
    status(page, PASSWORD_SAVED)
    expect(page.locator("#reset")).to_be_hidden()
    assert page.url == f"{base}/", page.url  # the token left the address bar
    browse.shot(tab, "reset-done")


# -- the journeys ---------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_journey(browse: Browse, site: Server, fake: FakeProvider, mail: MailSink) -> None:
    """Register, log in, chat streams line by line, history survives a reload, new chat
    empties it, a second device is listed and revoked, log out everywhere, forgot -> mailed
    link -> reset -> log in with the new password."""
    base = f"http://127.0.0.1:{site.port}"
    fake.always(Reply(deltas=LINES, delay=LINE_DELAY))
    email, password, name = random_email(), strong_password(), "Ada"
    tab = browse.open(f"{base}/")
    page = tab.page
    signed_out(page)
    browse.shot(tab, "start")

    register(page, email, password, name)
    browse.shot(tab, "registered")
    page.fill("#login-password", password)
    page.click("#login button[type=submit]")
    signed_in(page, email)
    expect(page.locator("#me-info")).to_have_text(f"Signed in as {email} ({name})")
    assert me(tab, base)["user"]["email"] == email
    browse.shot(tab, "signed-in")

    chat_streams_line_by_line(browse, tab, "Tell me four lines", by_enter=False)
    reload(page)
    signed_in(page, email)
    expect(page.locator("#chat-log .msg")).to_have_count(2)
    assert history_texts(page) == [("user", "Tell me four lines"), ("assistant", "".join(LINES))]
    browse.shot(tab, "history-after-reload")

    page.click("#new-chat")
    expect(page.locator("#chat-log .msg")).to_have_count(0)
    history = reload(page)
    assert history.json()["messages"] == [], history.json()
    signed_in(page, email)
    expect(page.locator("#chat-log .msg")).to_have_count(0)
    browse.shot(tab, "new-chat-after-reload")

    other = browse.open(f"{base}/")
    log_in(other.page, email, password)
    browse.shot(other, "second-device-signed-in")
    page.click("#sessions-refresh")
    expect(page.locator("#sessions-list li")).to_have_count(2)
    expect(page.locator("#sessions-list li", has_text=THIS_BROWSER)).to_have_count(1)
    browse.shot(tab, "two-sessions")
    page.locator("#sessions-list li", has_not_text=THIS_BROWSER).locator("button.revoke").click()
    status(page, "Done.")
    expect(page.locator("#sessions-list li")).to_have_count(1)
    expect(page.locator("#sessions-list li")).to_contain_text(THIS_BROWSER)
    browse.shot(tab, "other-revoked")
    reload(other.page)
    signed_out(other.page)
    browse.shot(other, "second-device-signed-out")

    page.select_option("#logout-scope", "global")
    page.click("#logout")
    status(page, LOGGED_OUT)
    signed_out(page)
    assert me(tab, base)["status"] == 401
    browse.shot(tab, "logged-out-everywhere")

    new_password = strong_password()
    reset_through_mail(browse, tab, mail, base, email, new_password)
    fill_login(page, email, password)
    status(page, "Invalid credentials", error=True)
    browse.shot(tab, "old-password-refused")
    log_in(page, email, new_password)
    browse.shot(tab, "signed-in-with-new-password")
    browse.assert_clean()


@pytest.mark.slow
def test_verify_email_link(browse: Browse, site: Server, mail: MailSink) -> None:
    """With EMAIL_VERIFICATION=optional, the mailed /verify_email link's button confirms the
    address: the page says so and /auth/me has email_verified true."""
    base = f"http://127.0.0.1:{site.port}"
    email, password = random_email(), strong_password()
    tab = browse.open(f"{base}/")
    page = tab.page
    expect(page.locator("#verify")).to_be_hidden()
    register(page, email, password)
    log_in(page, email, password)
    assert me(tab, base)["user"]["email_verified"] is False
    link = mailed_link(mail, email, "Confirm your email address", VERIFY_LINK)
    assert link.startswith(f"{base}/verify_email?token="), link
    goto(page, link)
    expect(page.locator("#verify")).to_be_visible()
    expect(page.locator("#reset")).to_be_hidden()
    signed_in(page, email)
    browse.shot(tab, "verify-page")
    page.click("#verify-button")
    status(page, VERIFIED)
    expect(page.locator("#verify")).to_be_hidden()
    signed_in(page, email)
    assert me(tab, base)["user"]["email_verified"] is True
    browse.shot(tab, "verified")
    browse.assert_clean()


@pytest.mark.slow
def test_two_factor_login(browse: Browse, site: Server) -> None:
    """An account with TOTP on (set up through the JSON API): the page's login asks for the
    code in the #mfa form, and the code signs the browser in."""
    base = f"http://127.0.0.1:{site.port}"
    client = site.client()
    email, password = random_email(), strong_password()
    assert client.register(email, password).status == 201
    assert client.login(email, password).status == 200
    setup = client.post("/auth/mfa/totp/setup", {"password": password})
    assert setup.status == 200, setup
    secret = setup.json()["secret"]
    # Confirm with the step of 15 s ago, log in with the step of 15 s ahead: the server
    # accepts one step either side, and the login's step is always later than the confirm's.
    confirm = client.post("/auth/mfa/totp/confirm", {"code": totp(secret, time.time() - 15)})
    assert confirm.status == 200, confirm

    tab = browse.open(f"{base}/")
    page = tab.page
    fill_login(page, email, password)
    expect(page.locator("#mfa")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#mfa-code")).to_be_focused()
    status(page, MFA_PROMPT)
    expect(page.locator("#me-info")).to_have_text(SIGNED_OUT)
    browse.shot(tab, "mfa-asked")
    page.fill("#mfa-code", totp(secret, time.time() + 15))
    page.click("#mfa button[type=submit]")
    signed_in(page, email)
    expect(page.locator("#mfa")).to_be_hidden()
    assert me(tab, base)["user"]["mfa_enabled"] is True
    browse.shot(tab, "mfa-signed-in")
    browse.assert_clean()


@pytest.fixture
def nginx_bin() -> str:
    """The nginx binary (CI installs it)."""
    binary = find_binary("nginx")
    if binary is None:
        unavailable("nginx is not installed (apt-get install nginx); the /cloudchat/ test needs it")
    assert binary is not None
    return binary


@pytest.mark.slow
def test_behind_nginx_under_prefix(
    browse: Browse,
    make_server: ServerFactory,
    nginx_bin: str,
    fake: FakeProvider,
    mail: MailSink,
) -> None:
    """Behind nginx with the shipped location block, at /cloudchat/: register, log in, a
    streamed chat round, history after a reload, forgot -> mailed link -> reset -> log in;
    every request the page makes stays under /cloudchat/."""
    app_port = free_port()
    front = Nginx(nginx_bin, [app_port])
    try:
        base = f"http://127.0.0.1:{front.port}/cloudchat"
        make_server.start(
            "embedded",
            {**chat_env(fake, mail), "PORT": str(app_port), "FRONTEND_BASE_URL": base},
        )
        front.start()
        fake.always(Reply(deltas=LINES, delay=LINE_DELAY))
        email, password = random_email(), strong_password()
        tab = browse.open(f"{base}/")
        page = tab.page
        signed_out(page)
        browse.shot(tab, "start")
        register(page, email, password)
        log_in(page, email, password)
        expect(page.locator("#sessions-list li")).to_have_count(1)
        browse.shot(tab, "signed-in")
        chat_streams_line_by_line(browse, tab, "Through nginx", by_enter=True)
        reload(page)
        signed_in(page, email)
        assert history_texts(page) == [("user", "Through nginx"), ("assistant", "".join(LINES))]
        browse.shot(tab, "history-after-reload")
        page.select_option("#logout-scope", "local")
        page.click("#logout")
        signed_out(page)
        new_password = strong_password()
        reset_through_mail(browse, tab, mail, base, email, new_password)
        log_in(page, email, new_password)
        browse.shot(tab, "signed-in-with-new-password")

        web = [urlsplit(url) for url in tab.requests if url.startswith("http")]
        assert web, tab.requests
        outside = [u.geturl() for u in web if not u.path.startswith("/cloudchat/")]
        assert not outside, outside
        assert {u.port for u in web} == {front.port}, tab.requests
        browse.assert_clean()
    finally:
        front.stop()


@pytest.mark.slow
def test_language_from_accept_language_and_switch(browse: Browse, site: Server) -> None:
    """zh-CN gets the Chinese page; the language button switches to English and back, and
    the choice outlives a reload."""
    base = f"http://127.0.0.1:{site.port}"
    tab = browse.open(f"{base}/", locale="zh-CN", extra_http_headers={"Accept-Language": "zh-CN"})
    page = tab.page
    login_button = page.locator("#login button[type=submit]")
    expect(login_button).to_have_text("登录")
    expect(page.locator("#me-info")).to_have_text("未登录。")
    expect(page.locator("#lang")).to_have_text("English")
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    browse.shot(tab, "chinese")

    page.click("#lang")
    expect(login_button).to_have_text("Log in")
    expect(page.locator("#me-info")).to_have_text(SIGNED_OUT)
    expect(page.locator("#lang")).to_have_text("中文")
    expect(page.locator("html")).to_have_attribute("lang", "en")
    reload(page)
    expect(login_button).to_have_text("Log in")
    expect(page.locator("html")).to_have_attribute("lang", "en")
    assert page.evaluate("localStorage.getItem('cloudchat-lang')") == "en"
    browse.shot(tab, "english-after-reload")

    page.click("#lang")
    expect(login_button).to_have_text("登录")
    reload(page)
    expect(login_button).to_have_text("登录")
    expect(page.locator("#register button[type=submit]")).to_have_text("注册账户")
    assert page.evaluate("localStorage.getItem('cloudchat-lang')") == "zh"
    browse.shot(tab, "chinese-after-reload")
    browse.assert_clean()


@pytest.mark.slow
def test_page_headers_narrow_screen_and_keyboard(browse: Browse, site: Server) -> None:
    """The page's CSP allows its own script and style by hash and no framing; at 320 px
    nothing scrolls sideways; register and log in with the keyboard only."""
    base = f"http://127.0.0.1:{site.port}"
    tab = browse.open(f"{base}/", viewport={"width": 320, "height": 640})
    page = tab.page

    response = goto(page, f"{base}/")
    csp = response.headers["content-security-policy"]
    body = response.text()
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        inline = body.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp, (tag, csp)
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
    assert not re.search(r"\son[a-z]+\s*=", body), "an inline event handler"
    assert response.headers["x-frame-options"] == "DENY", response.headers

    def fits() -> None:
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 320, f"{width} px wide at {page.url}"
        spilling = page.evaluate(OVERFLOWING)
        assert not spilling, f"content wider than its box at {page.url}: {spilling}"

    fits()
    browse.shot(tab, "narrow-start")
    for path in ("/reset_password?token=x", "/verify_email?token=x"):
        goto(page, f"{base}{path}")
        fits()
        browse.shot(tab, "narrow-" + path[1:].split("?")[0])
    goto(page, f"{base}/")

    # A real address can be long, and an address has no place to break a line.
    email, password = f"alexandra.konstantinou.{random_hex(4)}@example.com", strong_password()
    page.focus("#reg-email")
    page.keyboard.type(email)
    page.keyboard.press("Tab")
    expect(page.locator("#reg-password")).to_be_focused()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid", "no visible focus ring on the password field"
    page.keyboard.type(password)
    page.keyboard.press("Enter")
    status(page, REGISTERED)
    expect(page.locator("#login-password")).to_be_focused()
    page.keyboard.type(password)
    page.keyboard.press("Enter")
    signed_in(page, email)
    browse.shot(tab, "narrow-signed-in")
    fits()
    browse.assert_clean()
