"""The web app in a real browser (Chromium through Playwright) against a real server:
what a person does, and what they must see. Every page is checked with axe-core
(no serious or critical violation) and any CSP violation or script error fails the
test (see conftest.Page). Screenshots go to target/web-screenshots/."""

import re
import time
import uuid

from playwright.sync_api import expect

from conftest import CHAT_PER_MINUTE, FREE_MESSAGES, PASSWORD

TIMEOUT = 60_000


def send(page, text, max_tokens=None):
    if max_tokens:
        if not page.locator("#opt-max-tokens").is_visible():
            page.get_by_text("Options").click()
        page.locator("#opt-max-tokens").fill(str(max_tokens))
    page.locator("#message").fill(text)
    page.locator("#message").press("Enter")


def wait_answered(page):
    """Waits until no answer is streaming (Send is back)."""
    expect(page.locator("#send")).to_be_visible(timeout=TIMEOUT)
    expect(page.locator(".msg.streaming")).to_have_count(0, timeout=TIMEOUT)


def test_sign_in_wrong_password_register_and_sign_out(app, server):
    page = app.page
    email = server.user("pro")
    page.goto(server.base + "/")
    expect(page.get_by_role("heading", name="Sign in to ragchat")).to_be_visible()
    app.axe("sign-in")
    page.get_by_label("E-mail").fill(email)
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-error")).to_contain_text("Incorrect email or password")
    app.sign_in(email)
    expect(page.locator("#who-email")).to_have_text(email)
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in to ragchat")).to_be_visible()
    # The refresh token was revoked by the logout.
    assert page.evaluate("localStorage.getItem('ragchat.session')") is None

    # Registration signs the new account in on the free plan.
    new = f"new-{uuid.uuid4().hex[:8]}@browser.test"
    page.get_by_role("button", name="Create an account").click()
    page.get_by_label("E-mail").fill(new)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page.locator("#who-email")).to_have_text(new)
    page.goto(server.base + "/#/account")
    expect(page.locator("#current-plan")).to_have_text("free")


def test_a_deactivated_account_sees_why(app, server):
    page = app.page
    email = server.user("pro")
    app.sign_in(email)
    admin = server.token(server.admin)
    status, users = server.api("GET", f"/admin/users?email={email}", token=admin)
    assert status == 200
    status, _ = server.api("PATCH", f"/admin/users/{users['items'][0]['id']}", {"is_active": False}, admin)
    assert status == 200
    # The next call the page makes is refused: back to sign-in, with the reason.
    page.get_by_role("link", name="Account", exact=True).click()
    expect(page.locator("#notice")).to_contain_text("deactivated", timeout=TIMEOUT)
    expect(page.get_by_role("heading", name="Sign in to ragchat")).to_be_visible()
    page.get_by_label("E-mail").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-error")).to_contain_text("deactivated", timeout=TIMEOUT)


def test_upload_a_fact_then_the_answer_streams_and_cites_it(app, server, tmp_path):
    page = app.page
    app.sign_in(server.user("pro"))
    word = f"zorblax{uuid.uuid4().hex[:6]}"
    fact = tmp_path / f"{word}-notes.md"
    fact.write_text(
        f"# The {word} crystal\n\nThe {word} crystal of Quentaria melts at exactly 4123 kelvin. "
        f"Miners of Quentaria store the {word} crystal in cold caves.\n")
    bad = tmp_path / "picture.exe"
    bad.write_bytes(b"MZ\x00\x01")
    page.get_by_role("link", name="Knowledge", exact=True).click()
    expect(page.get_by_role("heading", name="Knowledge")).to_be_visible()
    page.locator("#file-input").set_input_files([str(fact), str(bad)])
    stored = page.locator(f'li.upload[data-file="{fact.name}"]')
    expect(stored.locator(".state")).to_contain_text("stored", timeout=TIMEOUT)
    # A file the server refuses shows the server's reason beside it.
    refused = page.locator('li.upload[data-file="picture.exe"]')
    expect(refused.locator(".error")).to_contain_text(re.compile("unsupported|type", re.I), timeout=TIMEOUT)
    expect(page.locator("#documents")).to_contain_text(f"The {word} crystal")
    # Dropped files upload too; a JSONL file of many documents becomes a background
    # job whose progress shows beside it.
    lines = "".join(f'{{"title": "Note {i} {word}", "text": "Note number {i} about {word} dunes."}}\n' for i in range(20))
    dropped = page.evaluate_handle("""(lines) => {
        const dt = new DataTransfer();
        dt.items.add(new File([lines], 'dropped.jsonl', {type: 'application/jsonl'}));
        return dt;
    }""", lines)
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dropped})
    job = page.locator('li.upload[data-file="dropped.jsonl"] .state')
    expect(job).to_contain_text("completed: 20 of 20 stored", timeout=TIMEOUT)
    # Re-indexing runs as a job too, and the fact is still found after it.
    page.get_by_role("button", name="Re-index my documents").click()
    expect(page.locator("#reindex-state")).to_contain_text("completed: 21 of 21 re-indexed", timeout=TIMEOUT)
    app.shot("knowledge")
    app.axe("knowledge")

    page.get_by_role("link", name="Chat", exact=True).click()
    send(page, f"At what temperature does the {word} crystal melt?", max_tokens=96)
    answer = page.locator(".msg.assistant").last
    # Streaming: the answer grows while it is marked as streaming.
    lengths = []
    deadline = time.time() + 60
    while time.time() < deadline:
        streaming = page.locator(".msg.assistant.streaming").count() > 0
        if not streaming and lengths:
            break
        if streaming:
            lengths.append(len(answer.locator(".body").inner_text()))
        time.sleep(0.02)
    wait_answered(page)
    grew = sorted(set(n for n in lengths if n > 0))
    assert len(grew) >= 2, f"the answer did not arrive in pieces: {lengths[:50]}"
    # Cited: the sources panel shows the uploaded document, numbered.
    expect(page.locator("#sources li").first).to_contain_text(f"The {word} crystal")
    expect(answer.get_by_role("button", name=re.compile("source"))).to_be_visible()
    assert page.locator("#messages").get_attribute("data-transport") == "websocket"
    # A citation [n] in the answer (when the model wrote one) opens source n.
    cites = answer.locator("button.cite")
    if cites.count():
        cites.first.click()
        expect(page.locator("#sources li.flash")).to_have_count(1)
    app.shot("chat")
    app.axe("chat with an answer")
    # The conversation is listed, newest first, and opens with its history.
    expect(page.locator("#sessions li").first).to_contain_text(word)
    page.reload()
    expect(page.locator(".msg.user")).to_contain_text(word)
    expect(page.locator(".msg.assistant")).to_have_count(1)


def test_stop_mid_answer_keeps_the_partial_answer(app, server):
    page = app.page
    app.sign_in(server.user("pro"))
    send(page, "Write a very long story about a lighthouse keeper and the sea, with many chapters.",
         max_tokens=1500)
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".body")).not_to_have_text("", timeout=TIMEOUT)
    page.locator("#stop").click()
    wait_answered(page)
    expect(answer.locator(".note")).to_contain_text("Stopped")
    partial = answer.locator(".body").inner_text().strip()
    assert partial
    # The server kept it: the conversation, opened again, has the partial answer, marked.
    page.reload()
    kept = page.locator(".msg.assistant").last
    expect(kept.locator(".note")).to_contain_text("Stopped")
    assert kept.locator(".body").inner_text().strip()[:20] == partial[:20]


def test_the_free_plan_reaches_its_quota_and_sees_the_upgrade_path(app, server):
    page = app.page
    app.sign_in(server.user("free"))
    for i in range(FREE_MESSAGES):
        send(page, f"Say hello number {i}.")
        wait_answered(page)
    send(page, "One more, please.")
    notice = page.locator("#quota-notice")
    expect(notice).to_contain_text("quota", timeout=TIMEOUT)
    expect(notice.get_by_role("link", name="Upgrade to pro")).to_be_visible()
    app.shot("quota")
    notice.get_by_role("link", name="Upgrade to pro").click()
    expect(page.locator("#usage")).to_contain_text(f"{FREE_MESSAGES} of {FREE_MESSAGES}")
    # Without a payment provider the upgrade is a request an admin approves.
    page.get_by_role("button", name="Upgrade to pro").click()
    expect(page.locator("#upgrade-pending")).to_contain_text("waiting")
    app.axe("account")


def test_a_rate_limited_user_sees_a_countdown(app, server):
    page = app.page
    app.sign_in(server.user("pro"))
    for i in range(CHAT_PER_MINUTE):
        send(page, f"Count to {i + 2}.", max_tokens=4)
        wait_answered(page)
    send(page, "And once more.")
    countdown = page.locator("#rate-countdown")
    expect(countdown).to_contain_text(re.compile(r"try again in \d+ s"), timeout=TIMEOUT)
    expect(page.locator("#send")).to_be_disabled()
    first = int(re.search(r"(\d+) s", countdown.inner_text()).group(1))
    time.sleep(2.2)
    later = int(re.search(r"(\d+) s", countdown.inner_text()).group(1))
    assert later < first, (first, later)
    # The message is kept in the box to send again.
    expect(page.locator("#message")).to_have_value("And once more.")
    app.shot("rate-limited")


def test_an_admin_sees_the_supervision_tree_and_a_user_cannot(app, server, browser):
    page = app.page
    app.sign_in(server.admin)
    page.get_by_role("link", name="Admin", exact=True).click()
    actors = page.locator("#actors")
    expect(actors).to_contain_text("billing-ledger", timeout=TIMEOUT)
    expect(actors).to_contain_text("retrieval")
    expect(page.locator("#charts figure")).to_have_count(3)
    # It refreshes live: the charts gain points.
    time.sleep(4.5)
    points = page.locator("#charts polyline").first.get_attribute("points")
    assert len(points.split()) >= 2, points
    expect(page.locator("#users")).to_contain_text(server.admin)
    app.shot("admin")
    app.axe("admin")

    # A regular user: no link, no page, and the API refuses.
    other = browser.new_context()
    try:
        user_page = other.new_page()
        email = server.user("pro")
        user_page.goto(server.base + "/")
        user_page.get_by_label("E-mail").fill(email)
        user_page.get_by_label("Password").fill(PASSWORD)
        user_page.get_by_role("button", name="Sign in").click()
        user_page.wait_for_selector("#topbar:not([hidden])")
        expect(user_page.get_by_role("link", name="Admin", exact=True)).to_have_count(0)
        user_page.goto(server.base + "/#/admin")
        expect(user_page.locator("#forbidden")).to_be_visible()
        status, _ = server.api("GET", "/admin/actors", token=server.token(email))
        assert status == 403
    finally:
        other.close()


def test_model_and_document_text_cannot_inject_markup(app, server):
    page = app.page
    app.sign_in(server.user("pro"))
    rendered = page.evaluate("""async () => {
        const md = await import('/app/js/markdown.js');
        const box = document.createElement('div');
        box.append(md.render(
          '<img src=x onerror="window.pwned=1"> **bold** [x](javascript:window.pwned=2) '
          + '[ok](https://example.com) `<b>code</b>` [1] [7]\\n\\n```\\n<script>window.pwned=3</script>\\n```',
          {sources: 1, citation: (n) => { const b = document.createElement('button'); b.className = 'cite'; b.textContent = n; return b; }}));
        document.body.append(box);
        return {
          html: box.innerHTML,
          imgs: box.querySelectorAll('img').length,
          scripts: box.querySelectorAll('script').length,
          links: [...box.querySelectorAll('a')].map(a => a.href),
          cites: box.querySelectorAll('button.cite').length,
          strong: box.querySelectorAll('strong').length,
          pwned: window.pwned || 0,
        };
    }""")
    assert rendered["imgs"] == 0 and rendered["scripts"] == 0, rendered
    assert rendered["links"] == ["https://example.com/"], rendered
    assert rendered["cites"] == 1, "only [1] is a known source"
    assert rendered["strong"] == 1
    assert rendered["pwned"] == 0
    assert "&lt;img" in rendered["html"]


def test_supporting_quotes_are_marked_in_the_excerpt_as_text(app, server):
    page = app.page
    app.sign_in(server.user("pro"))
    rendered = page.evaluate("""async () => {
        const { excerptWithQuotes } = await import('/app/js/quotes.js');
        const box = document.createElement('div');
        box.append(...excerptWithQuotes({
          excerpt: 'Ærø is small. Its ferry <b>leaves</b> at 9. More text…',
          quotes: [
            {text: 'Its ferry <b>leaves</b> at 9.', start: 14, end: 43, score: 0.9},
            {text: 'A sentence past the excerpt.', start: 400, end: 428, score: 0.7},
          ],
        }));
        return {
          marks: [...box.querySelectorAll('mark.quote')].map(m => m.textContent),
          inExcerpt: box.querySelector('p.excerpt mark.quote')?.textContent,
          bold: box.querySelectorAll('b').length,
          text: box.querySelector('p.excerpt').textContent,
        };
    }""")
    assert rendered["inExcerpt"] == "Its ferry <b>leaves</b> at 9.", rendered
    assert rendered["marks"] == ["Its ferry <b>leaves</b> at 9.", "A sentence past the excerpt."], rendered
    assert rendered["bold"] == 0, "quoted text is text, not markup"
    assert rendered["text"] == "Ærø is small. Its ferry <b>leaves</b> at 9. More text…"


def test_answers_stream_over_sse_when_websockets_are_blocked(app, server):
    page = app.page
    page.route_web_socket(re.compile(r".*/ws/chat.*"), lambda ws: ws.close())
    app.sign_in(server.user("pro"))
    send(page, "Say something short.")
    wait_answered(page)
    assert page.locator("#messages").get_attribute("data-transport") == "sse"
    expect(page.locator(".msg.assistant .body").last).not_to_have_text("")
    # Stop works over SSE too.
    send(page, "Write a very long story about mountains.", max_tokens=1500)
    expect(page.locator(".msg.assistant .body").last).not_to_have_text("", timeout=TIMEOUT)
    page.locator("#stop").click()
    wait_answered(page)
    expect(page.locator(".msg.assistant .note").last).to_contain_text("Stopped")


def test_api_keys_are_shown_once_listed_and_revoked(app, server):
    page = app.page
    app.sign_in(server.user("pro"))
    page.goto(server.base + "/#/account")
    page.get_by_label("Name").fill("laptop script")
    page.get_by_role("button", name="Create key").click()
    key = page.locator("#new-key-value").input_value()
    assert len(key) > 20
    expect(page.locator("#api-keys")).to_contain_text("laptop script")
    status, _ = server.api("GET", "/auth/me", token=key)
    assert status == 200
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Revoke key laptop script").click()
    expect(page.locator("#api-keys")).not_to_contain_text("laptop script")
    status, _ = server.api("GET", "/auth/me", token=key)
    assert status == 401


def test_usable_at_phone_width(browser, server):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = ctx.new_page()
        page.goto(server.base + "/")
        page.get_by_label("E-mail").fill(server.user("pro"))
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#message")).to_be_visible()
        send(page, "Hello!")
        wait_answered(page)
        # Nothing wider than the screen.
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        page.screenshot(path=str(__import__("conftest").SCREENSHOTS / "phone-chat.png"), full_page=True)
    finally:
        ctx.close()


def test_the_access_token_is_refreshed_in_the_background(app, server):
    page = app.page
    app.sign_in(server.user("pro"))
    before = page.evaluate("JSON.parse(localStorage.getItem('ragchat.session'))")
    # As if the access token were about to expire: the next call refreshes it first.
    page.evaluate("""() => {
        const s = JSON.parse(localStorage.getItem('ragchat.session'));
        s.expires_at = Date.now() + 5000;
        localStorage.setItem('ragchat.session', JSON.stringify(s));
    }""")
    page.reload()
    page.get_by_role("link", name="Account", exact=True).click()
    expect(page.locator("#current-plan")).to_have_text("pro")
    after = page.evaluate("JSON.parse(localStorage.getItem('ragchat.session'))")
    assert after["refresh_token"] != before["refresh_token"]
    assert after["expires_at"] > before["expires_at"] - 60_000
    # The old refresh token was spent by the refresh: presenting it again is refused.
    status, _ = server.api("POST", "/auth/refresh", {"refresh_token": before["refresh_token"]})
    assert status == 401
