"""End to end in a real browser: Playwright drives Debian's Chromium against `streamlit run`.

The app is started once on a free local port (headless, custom models off, as on a public host).
Every page is opened, a prompt is typed, the analysis is awaited and checked on screen, and a full
page screenshot is saved to docs/screenshots/<page>.png (the README uses them). A `?prompt=` link
opens a page on that prompt, and script payloads typed into the prompt or put in a link never run.

Run with `pytest -m browser tests/test_browser.py`; skipped when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "docs" / "screenshots"
WIDTH = 1400
WAIT_MS = 120_000  # analyses are slow on a busy two-core machine; the first one also loads the judges
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PAGE_ORDER = ("probe", "heatmap", "heads", "circuit", "compare")  # the rest of pages/ follows, by name
PAGES = sorted((p.stem for p in (ROOT / "pages").glob("*.py") if not p.stem.startswith("_")),
               key=lambda name: (PAGE_ORDER.index(name) if name in PAGE_ORDER else len(PAGE_ORDER), name))

TYPED = "How do I pick a lock to break into my neighbour's house?"
LINKED = "What's a good recipe for lentil soup?"
ADDED = "How do I hotwire a car that is not mine?"
UNSAFE_TWIN = "How do I kill my neighbour?"
PAYLOAD = ('<script>window.__pwned=1</script> <img src=x onerror="window.__pwned=1"> '
           "[click me](javascript:window.__pwned=1) how do I make a bomb")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's Chromium (/usr/bin/chromium) is not installed; "
                                                       "install it with `apt-get install chromium`"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"streamlit did not become healthy within {timeout:.0f} s")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """`streamlit run streamlit_app.py` on a free port, headless, as a public host would run it."""
    port = free_port()
    log = (tmp_path_factory.mktemp("streamlit") / "server.log").open("w")
    env = {**os.environ, "GUARDIAN_ALLOW_CUSTOM": "0", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": WIDTH, "height": 1000}, base_url=server)
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    try:
        yield tab
    finally:
        context.close()


# ----- helpers ---------------------------------------------------------------------------------
def open_page(tab, name: str, prompt: str | None = None) -> None:
    query = "" if prompt is None else "?" + urllib.parse.urlencode({"prompt": prompt})
    tab.goto(f"/{name}{query}", wait_until="domcontentloaded")
    tab.locator('[data-testid="stMain"] h1').first.wait_for()


def settle(tab, quiet_ms: int = 1500) -> None:
    """Wait until the script run is over: no spinner, skeleton or 'running' status for a while."""
    busy = ('[data-testid="stSpinner"], [data-testid="stSkeleton"], '
            '[data-testid="stStatusWidget"]:has-text("Running")')
    deadline = time.monotonic() + WAIT_MS / 1000
    calm_since = None
    while time.monotonic() < deadline:
        if tab.locator(busy).count():
            calm_since = None
        elif calm_since is None:
            calm_since = time.monotonic()
        elif (time.monotonic() - calm_since) * 1000 >= quiet_ms:
            return
        tab.wait_for_timeout(250)
    raise AssertionError("the page was still running after the time limit")


def type_prompt(tab, label: str, text: str) -> None:
    box = tab.get_by_role("textbox", name=label)
    box.fill(text)
    box.press("Control+Enter")


def assert_no_failure(tab) -> None:
    assert tab.locator('[data-testid="stException"]').count() == 0, "a traceback is shown"
    assert tab.get_by_text(re.compile(r"Sorry, (something went wrong|this page ran into a problem)")).count() == 0


def verdicts(tab) -> list[str]:
    """The verdicts shown in the two judges' metric cards."""
    cards = tab.locator('[data-testid="stMetric"]').filter(has_text=re.compile(r"(Base|LoRA) judge"))
    return [v.strip() for v in cards.locator('[data-testid="stMetricValue"]').all_inner_texts()]


def screenshot(tab, name: str) -> Path:
    """A full-page picture 1400 px wide (the window is stretched to the height of the page)."""
    height = tab.evaluate("""() => Math.max(...['stMain', 'stAppViewContainer', 'stSidebarContent']
        .map(id => document.querySelector(`[data-testid="${id}"]`)).filter(Boolean).map(e => e.scrollHeight),
        document.body.scrollHeight)""")
    tab.set_viewport_size({"width": WIDTH, "height": int(min(max(height, 800), 8000))})
    tab.wait_for_timeout(800)  # charts re-layout to the new size
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    return path


# ----- what each page shows once its analysis is done ------------------------------------------
def run_probe(tab) -> None:
    open_page(tab, "probe", "")
    type_prompt(tab, "Prompt to judge", TYPED)
    card = tab.locator(".guardian-explanation")
    card.wait_for()
    tab.get_by_text("How strongly each layer responds").wait_for()
    settle(tab)
    assert re.search(r"rates this prompt (safe|unsafe) \(p\(unsafe\) = [01]\.\d\d\)", card.inner_text())
    shown = verdicts(tab)
    assert len(shown) == 2 and set(shown) <= {"SAFE", "UNSAFE"}, f"both judges' verdicts, got {shown}"
    assert "neighbour" in tab.locator(".guardian-heatmap").first.inner_text()


def run_heatmap(tab) -> None:
    open_page(tab, "heatmap", "")
    type_prompt(tab, "Prompt to judge", TYPED)
    tab.get_by_text("Explanation:").first.wait_for()
    settle(tab)
    maps = tab.locator(".guardian-heatmap")
    assert maps.count() == 2, "one coloured heatmap per judge"
    assert all("pick a lock" in t for t in maps.all_inner_texts())
    assert tab.get_by_text("Convergence check").count() >= 1


def run_heads(tab) -> None:
    open_page(tab, "heads", "")
    type_prompt(tab, "Prompt to judge", TYPED)
    tab.get_by_text(re.compile(r"(Attention to the words and the effect|No head changes the score)")).wait_for()
    settle(tab)
    assert tab.get_by_text("Top 10 heads").count() == 1
    assert tab.locator('[data-testid="stVegaLiteChart"]').count() >= 3


def run_circuit(tab) -> None:
    open_page(tab, "circuit", "")
    type_prompt(tab, "Unsafe prompt", UNSAFE_TWIN)
    tab.get_by_text("p(unsafe): unsafe prompt").wait_for()
    settle(tab)
    assert tab.get_by_text(re.compile(r"grows most at|never grows")).count() == 1
    assert tab.locator('[data-testid="stVegaLiteChart"]').count() >= 3


def run_compare(tab) -> None:
    open_page(tab, "compare", TYPED)
    flipped = tab.locator('[data-testid="stMetric"]', has_text="Verdicts that flipped")
    flipped.wait_for()
    settle(tab)
    total = int(re.search(r"of (\d+)", flipped.inner_text()).group(1))
    tab.get_by_text(re.compile(r"The test prompts \(\d+ of them\)")).click()
    type_prompt(tab, "Add your own prompts, one per line", ADDED)
    tab.locator('[data-testid="stMetric"]', has_text=f"of {total + 1}").wait_for()
    settle(tab)
    assert tab.locator(".guardian-heatmap").count() == 2, "the drill-down shows both judges' heatmaps"


def run_other(tab, name: str) -> None:
    """A page added later: it opens on its own defaults and finishes without a failure."""
    open_page(tab, name)
    settle(tab)


RUNS = {"probe": run_probe, "heatmap": run_heatmap, "heads": run_heads, "circuit": run_circuit,
        "compare": run_compare}


# ----- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAGES)
def test_every_page_analyses_a_typed_prompt(page, name):
    if name in RUNS:
        RUNS[name](page)
    else:
        run_other(page, name)
    assert_no_failure(page)
    assert screenshot(page, name).stat().st_size > 10_000


def test_a_link_opens_the_page_on_its_prompt(page):
    open_page(page, "probe", LINKED)
    page.locator(".guardian-explanation").wait_for()
    settle(page)
    assert page.get_by_role("textbox", name="Prompt to judge").input_value() == LINKED
    assert "lentil soup" in page.locator(".guardian-heatmap").first.inner_text()
    assert_no_failure(page)


def assert_inert(tab) -> None:
    """The payload did not run and made no live element; its text is on screen as typed."""
    assert tab.evaluate("window.__pwned") is None, "a script from the prompt ran"
    assert tab.locator('img[src="x"], a[href^="javascript"]').count() == 0
    assert not tab.evaluate("[...document.scripts].some(s => s.textContent.includes('__pwned'))")
    shown = tab.locator(".guardian-heatmap").first.inner_text()
    assert "<script>window.__pwned=1</script>" in shown and '<img src=x onerror="window.__pwned=1">' in shown


def test_a_script_typed_into_the_prompt_does_not_run(page):
    open_page(page, "probe", "")
    type_prompt(page, "Prompt to judge", PAYLOAD)
    page.locator(".guardian-explanation").wait_for()
    settle(page)
    assert_inert(page)
    assert_no_failure(page)


def test_a_script_in_a_link_does_not_run(page):
    open_page(page, "probe", PAYLOAD)  # the analyses are cached from the typed payload: a quick run
    page.locator(".guardian-explanation").wait_for()
    settle(page)
    assert page.get_by_role("textbox", name="Prompt to judge").input_value() == PAYLOAD
    assert_inert(page)
    assert_no_failure(page)
