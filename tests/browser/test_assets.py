"""How the app is served: every asset under the CSP, revalidated by ETag, small, and
nothing fetched from elsewhere."""

import gzip
import re
import urllib.parse
import urllib.request

BUDGET_GZIP = 250 * 1024


def fetch(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def assets(server):
    """The page and every file it loads (scripts import each other)."""
    _, _, html = fetch(server.base + "/")
    found = set(re.findall(r'(?:src|href)="(/app/[^"]+)"', html.decode()))
    queue = [u for u in found if u.endswith(".js")]
    while queue:
        url = queue.pop()
        _, _, body = fetch(server.base + url)
        for rel in re.findall(r"""(?:from|import\()\s*['"](\.{1,2}/[^'"]+)['"]""", body.decode()):
            target = urllib.parse.urljoin(server.base + url, rel)[len(server.base):]
            if target not in found:
                found.add(target)
                queue.append(target)
    return ["/"] + sorted(found)


def test_every_asset_is_under_the_csp_with_an_etag_and_small(server):
    urls = assets(server)
    assert "/app/js/pages/chat.js" in urls and "/app/app.css" in urls, urls
    total = 0
    for url in urls:
        status, headers, body = fetch(server.base + url)
        assert status == 200, url
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe-inline" not in csp, csp
        assert "frame-ancestors 'none'" in csp
        assert headers["x-content-type-options"] == "nosniff"
        etag = headers["etag"]
        status, _, again = fetch(server.base + url, {"If-None-Match": etag})
        assert status == 304 and again == b"", url
        text = body.decode()
        # Nothing from elsewhere: no absolute URLs to load, no inline handlers or styles.
        assert not re.search(r"""(?:src|href)=["']https?://""", text), url
        assert not re.search(r"<script>|\sstyle=|\son\w+=", text) or not url.endswith(".html"), url
        total += len(gzip.compress(body))
    assert total <= BUDGET_GZIP, f"assets are {total} bytes gzipped (budget {BUDGET_GZIP})"
    print(f"web assets: {len(urls)} files, {total} bytes gzipped")


def test_unknown_assets_are_404_and_the_api_is_unchanged(server):
    status, headers, _ = fetch(server.base + "/app/js/nope.js")
    assert status == 404 and "content-security-policy" in headers
    status, _, _ = fetch(server.base + "/app/../Cargo.toml")
    assert status == 404
    status, _, body = fetch(server.base + "/no/such/route")
    assert status == 404 and b'"detail"' in body
    status, _, body = fetch(server.base + "/health")
    assert status == 200
