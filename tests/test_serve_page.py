"""The page at / of a real `expertpager serve`, in a real headless Chromium (Debian's, driven by Playwright): it
loads, sends a chat message, shows the streamed reply with its paging stats, and draws a non-empty cache grid."""

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)")

CACHED_PIXELS = """() => {
  const c = document.getElementById("grid"), d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] === 0x4f && d[i + 1] === 0x83 && d[i + 2] === 0xcc) n++;
  return n;
}"""


@pytest.fixture(scope="module")
def page(demo_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page()
        page.set_default_timeout(120_000)  # a bound on waiting on a busy machine, not a check
        page.goto(demo_server.url + "/")
        yield page
        browser.close()


def test_page_chats_and_shows_the_cache(page):
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    assert page.inner_text("#model") == "expertpager-demo"
    page.fill("#max-tokens", "12")
    page.fill("#temperature", "0")  # greedy: the demo model's answer to this runs past 12 tokens
    page.fill("#input", "What does the for statement do?")
    page.press("#input", "Enter")
    page.wait_for_selector(".stats")
    assert page.inner_text(".msg.user") == "What does the for statement do?"
    assert page.inner_text(".msg.assistant").strip()
    assert "12 tokens" in page.inner_text(".stats") and "hit rate" in page.inner_text(".stats")
    page.wait_for_function("Number(document.getElementById('n-cached').textContent) > 0")
    assert page.evaluate(CACHED_PIXELS) > 0
    assert "budget in use" in page.inner_text("#bytes")
    page.wait_for_function("Number(document.body.dataset.frames) >= 2")  # the feed keeps coming
