"""The browser tests' fixtures: a real `ragchat serve` on a free loopback port (its
own SQLite files, the models of scripts/fetch-models) and Chromium driven by
Playwright. Run by scripts/test-web, which installs what is missing."""

import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid

import pytest
from playwright.sync_api import sync_playwright

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCREENSHOTS = pathlib.Path(os.environ.get("WEB_SCREENSHOTS", ROOT / "target" / "web-screenshots"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
AXE = os.environ.get("AXE_JS", "")
PASSWORD = "browser-password-123"

# Small limits so that each flow reaches them quickly; every flow has its own user.
FREE_MESSAGES = 2
CHAT_PER_MINUTE = 3


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, base, workdir, binary, env):
        self.base = base
        self.workdir = workdir
        self.binary = binary
        self.env = env

    def api(self, method, path, body=None, token=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        if token:
            req.add_header("authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, (json.loads(raw) if raw else None)

    def user(self, plan="pro", admin=False):
        """A new account (made with the CLI, so any plan) → its e-mail."""
        email = f"{plan}-{uuid.uuid4().hex[:10]}@browser.test"
        args = [self.binary, "create-user", "--email", email, "--plan", plan]
        if admin:
            args.append("--superuser")
        env = dict(self.env, RAGCHAT_NEW_USER_PASSWORD=PASSWORD)
        subprocess.run(args, env=env, check=True, capture_output=True, cwd=ROOT)
        return email

    def token(self, email):
        status, body = self.api("POST", "/auth/login", {"email": email, "password": PASSWORD})
        assert status == 200, body
        return body["access_token"]


@pytest.fixture(scope="session")
def server():
    target = os.environ.get("CARGO_TARGET_DIR", str(pathlib.Path.home() / ".cache" / "ragchat-target"))
    binary = os.environ.get("RAGCHAT_BIN", os.path.join(target, "debug", "ragchat"))
    work = tempfile.mkdtemp(prefix="ragchat-web-")
    port = free_port()
    env = dict(os.environ)
    env.update({
        "RAGCHAT_ENV": "test",
        "RAGCHAT__SERVER__HOST": "127.0.0.1",
        "RAGCHAT__SERVER__PORT": str(port),
        "RAGCHAT__SERVER__WORKERS": "2",
        "RAGCHAT__DATABASE__URL": f"sqlite:{work}/accounts.db?mode=rwc",
        "RAGCHAT__KNOWLEDGE__SQLITE_URL": f"sqlite:{work}/knowledge.db?mode=rwc",
        "RAGCHAT__CHAT__SQLITE_URL": f"sqlite:{work}/chat.db?mode=rwc",
        "RAGCHAT__KNOWLEDGE__INDEX_DIR": f"{work}/index",
        "RAGCHAT__LEDGER__SPOOL_PATH": f"{work}/spool.jsonl",
        "RAGCHAT__KNOWLEDGE__PDF_EXTRACTOR": binary,
        "RAGCHAT__MODELS__DEFAULT_MAX_TOKENS": "24",
        "RAGCHAT__RATE_LIMITS__CHAT__LIMIT": str(CHAT_PER_MINUTE),
        "RAGCHAT__RATE_LIMITS__CHAT__PERIOD_SECS": "60",
    })
    for k in [k for k in env if k.startswith("RAGCHAT__") and k.endswith("_URL") and "SQLITE" not in k and k != "RAGCHAT__DATABASE__URL"]:
        env.pop(k)  # the embedded stores, whatever the shell has configured
    subprocess.run([binary, "migrate"], env=env, check=True, capture_output=True, cwd=ROOT)
    log = open(os.path.join(work, "server.log"), "w")
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError("the server did not start:\n" + open(os.path.join(work, "server.log")).read())
            time.sleep(0.5)
    srv = Server(base, work, binary, env)
    # Free accounts may send FREE_MESSAGES messages a month in these tests.
    admin = srv.user("enterprise", admin=True)
    status, body = srv.api("PUT", "/admin/settings/subscription_limits",
                           {"free": {"messages": FREE_MESSAGES}}, srv.token(admin))
    assert status == 200, body
    srv.admin = admin
    yield srv
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    if os.environ.get("WEB_KEEP_LOG"):
        print(open(os.path.join(work, "server.log")).read()[-5000:])


@pytest.fixture(scope="session")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A browser tab on the app that fails the test on any CSP violation or script error."""

    def __init__(self, page, server):
        self.page = page
        self.server = server
        self.problems = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))

    def _console(self, msg):
        text = msg.text
        if "Content Security Policy" in text or (msg.type == "error" and "Failed to load resource" not in text):
            self.problems.append(f"console {msg.type}: {text}")

    def sign_in(self, email):
        p = self.page
        p.goto(self.server.base + "/")
        p.get_by_label("E-mail").fill(email)
        p.get_by_label("Password").fill(PASSWORD)
        p.get_by_role("button", name="Sign in").click()
        p.wait_for_selector("#topbar:not([hidden])")

    def shot(self, name):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def axe(self, name):
        """axe-core on the page as it is: no serious or critical violation."""
        if not AXE:
            pytest.fail("AXE_JS is not set (scripts/test-web fetches axe-core)")
        # Runtime evaluation (DevTools protocol), not an inline <script>: the page's
        # CSP stays as strict as it is for users.
        self.page.evaluate(pathlib.Path(AXE).read_text() + "\n;0")
        result = self.page.evaluate(
            "async () => { const r = await axe.run(document, {resultTypes: ['violations']});"
            " return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
            " nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))})); }")
        bad = [v for v in result if v["impact"] in ("serious", "critical")]
        assert not bad, f"axe on {name}: {json.dumps(bad, indent=1)}"

    def check(self):
        assert not self.problems, "\n".join(self.problems)


@pytest.fixture
def app(browser, server, request):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    page = Page(ctx.new_page(), server)
    yield page
    try:
        page.check()
    finally:
        ctx.close()
