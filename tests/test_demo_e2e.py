"""End to end: `d2f.demo`'s page served on a free loopback port, driven by Gradio's own client
and by a headless Chromium (playwright driving the system's `chromium`), then shut down.

Needs the `demo` extras and Chromium: `bash scripts/install_demo_deps.sh`. The browser test skips,
saying so, when either is missing. The screenshot goes to `$D2F_DEMO_SCREENSHOT` when set (the
README's `docs/demo.png` is made that way), else into the test's temporary directory. Every
connection this process opens is checked to go to the loopback address, and so is every request
of the browser.
"""

import ipaddress
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from d2f.decoding import generate  # noqa: E402
from d2f.demo import engine  # noqa: E402

pytestmark = pytest.mark.slow
WORLD = "add2"
DEFAULTS = ("d2f", 32, 0.1, 0.95, 0.9, 0)  # strategy, block size, taus, max new tokens (0 = fit)


def _loopback(address) -> bool:
    if not isinstance(address, tuple):  # a unix socket
        return True
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(scope="module")
def outbound():
    """Every connection attempt this process makes to a non-loopback address (refused)."""
    seen = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if not _loopback(address):
            seen.append(address)
            raise ConnectionRefusedError(f"test: no connections off the loopback ({address})")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _loopback(address):
            seen.append(address)
            return 111  # ECONNREFUSED
        return real_connect_ex(self, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    yield seen
    socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex


@pytest.fixture(scope="module")
def server(tmp_path_factory, outbound):
    """The default page (no quickstart cache: the teacher undistilled) on a free loopback port;
    stopped at the end, and checked to be gone."""
    from d2f.demo import app

    models = engine.resolve_models(WORLD, quickstart_out=tmp_path_factory.mktemp("no_qs"))
    sides = engine.load_sides(models)
    problems = engine.held_out_problems(WORLD, 5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = app.build(sides, "test", problems)
    app.launch(page, "127.0.0.1", port, concurrency=4, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", sides, problems
    finally:
        page.close(verbose=False)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "the server still answers"
        assert outbound == [], f"connections off the loopback: {outbound}"


def _reference(sides, question, configs):
    out = []
    for side, cfg in zip(sides, configs, strict=True):
        ids = engine.prompt_ids(side.tokenizer, question)
        out.append(generate(side.model, [ids], cfg, side.tokenizer))
    return out


def _counter(html: str, name: str) -> str:
    head = f"data-counter='{name}'>"
    assert head in html, html
    return html.split(head, 1)[1].split("<", 1)[0]


def test_client_two_tabs_at_once(server):
    """Two sessions submit at once; each gets its own prompt's answers and DecodeStats."""
    url, sides, problems = server
    configs = engine.settings(*DEFAULTS[1:5], DEFAULTS[0], None)
    questions = [problems[0][0], problems[1][0]]
    clients = [gradio_client.Client(url, verbose=False) for _ in questions]
    # the held-out picker fills the prompt and shows the reference answer
    prompt, reference = clients[0].predict(questions[0], api_name="/pick")
    assert prompt == questions[0] and problems[0][1] in reference
    with ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(c.predict, q, *DEFAULTS, api_name="/generate")
            for c, q in zip(clients, questions, strict=True)
        ]
        results = [j.result(timeout=300) for j in jobs]
    for q, (message, d2f_counters, d2f_text, pipeline, ar_counters, ar_text) in zip(
        questions, results, strict=True
    ):
        ref = _reference(sides, q, configs)
        assert "Both sides finished" in message
        assert d2f_text == ref[0].texts[0] and ar_text == ref[1].texts[0]
        for html, out in ((d2f_counters, ref[0]), (ar_counters, ref[1])):
            assert "data-status='done'" in html
            assert _counter(html, "tokens") == str(out.stats.tokens)
            assert _counter(html, "forwards") == str(out.stats.forwards)
            assert _counter(html, "tokens / forward") == f"{out.stats.tokens_per_forward:.2f}"
        assert "block 0:" in pipeline
    clients[0].predict(api_name="/stop")  # nothing running: a no-op, no error


def test_client_bad_value_is_a_message(server):
    url, _, problems = server
    client = gradio_client.Client(url, verbose=False)
    out = client.predict(problems[0][0], "d2f", 32, 1.5, 0.95, 0.9, 0, api_name="/generate")
    assert out[0] == "**Cannot run:** tau_add must be in [0, 1], got 1.5"
    out = client.predict("", *DEFAULTS, api_name="/generate")
    assert out[0] == "**Cannot run:** the prompt is empty"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_browser_shows_answers_and_counters(server, tmp_path):
    """A headless Chromium types a held-out problem, sets block size 8 (two blocks in flight),
    presses the button, waits for both sides, checks the page and saves a screenshot."""
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="bash scripts/install_demo_deps.sh"
    )
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium on PATH: bash scripts/install_demo_deps.sh")
    url, sides, problems = server
    question = problems[0][0]
    ref = _reference(sides, question, engine.settings(8, 0.1, 0.95, 0.9))
    shot = Path(os.environ.get("D2F_DEMO_SCREENSHOT") or tmp_path / "demo.png")
    requests = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=browser_path,
            # root in a container has no sandbox; every host name but the loopback fails
            args=["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            page.locator("#prompt textarea").fill(question)
            page.locator("#block-size input").fill("8")
            page.locator("#block-size input").press("Tab")
            page.locator("#go").click()
            for side in ("d2f", "ar"):
                page.wait_for_selector(f"#{side}-counters [data-status=done]", timeout=120_000)
            assert page.locator("#d2f-answer textarea").input_value() == ref[0].texts[0]
            assert page.locator("#ar-answer textarea").input_value() == ref[1].texts[0]
            for side, out in (("d2f", ref[0]), ("ar", ref[1])):
                counters = page.locator(f"#{side}-counters")
                forwards = counters.locator("[data-counter=forwards]").inner_text()
                assert forwards == str(out.stats.forwards)
                assert counters.locator("[data-counter=tokens]").inner_text() == str(
                    out.stats.tokens
                )
            assert "Both sides finished" in page.locator("#message").inner_text()
            assert page.locator("#d2f-pipeline .d2f-block").count() >= 1
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    origin = url.rstrip("/")
    off = [u for u in requests if not (u.startswith(origin) or u.startswith("data:"))]
    assert off == [], f"the page requested {off}"
