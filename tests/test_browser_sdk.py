"""The official openai npm SDK in a browser page (headless Chromium, driven by Playwright)
against `kvformer serve`: from an origin named with --cors-origin its requests, with the
SDK's own x-stainless-* headers and the API key, pass the CORS preflight and get answers
(plain and streamed); from another origin the browser refuses them.

The page loads the SDK's ES modules as npm installs them (no bundler: they import each
other by relative paths) from a second loopback server, which makes the page's origin
differ from the API's. Needs Chromium and playwright (as tests/test_ui.py) and the npm
package: `npm install --prefix tests/js` (the version is pinned in tests/js/package.json);
without them the test skips, saying so.
"""

import http.server
import importlib.util
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from kvformer import ModelConfig, Transformer
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = os.environ.get("KVFORMER_CHROMIUM") or shutil.which("chromium") or \
    shutil.which("chromium-browser")
HAVE_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
SDK = Path(__file__).parent / "js" / "node_modules" / "openai"
pytestmark = [pytestmark, pytest.mark.skipif(
    not (CHROMIUM and HAVE_PLAYWRIGHT and (SDK / "index.mjs").exists()),
    reason="needs Chromium, playwright and the openai npm package (npm install --prefix "
           "tests/js)")]

# The page: the SDK as the browser loads it, one plain and one streamed request; what came
# back (or the error) lands in window.result. The API's address comes in the query string.
PAGE = """<!doctype html><meta charset="utf-8"><title>sdk</title>
<script type="module">
import OpenAI from "/openai/index.mjs";
const api = new URLSearchParams(location.search).get("api");
const client = new OpenAI({baseURL: api + "/v1", apiKey: "sesame", maxRetries: 0,
                           dangerouslyAllowBrowser: true});
const messages = [{role: "user", content: "Hello"}];
try {
  const plain = await client.chat.completions.create({model: "tiny", messages,
                                                      max_tokens: 5, temperature: 0});
  let streamed = "";
  const stream = await client.chat.completions.create({model: "tiny", messages,
      max_tokens: 5, temperature: 0, stream: true});
  for await (const chunk of stream) streamed += chunk.choices[0]?.delta?.content ?? "";
  window.result = {text: plain.choices[0].message.content, streamed,
                   tokens: plain.usage.completion_tokens};
} catch (e) {
  window.result = {error: e.constructor.name + ": " + e.message};
}
</script>"""


class PageHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript"}

    def do_GET(self):  # noqa: N802 - the http.server hook's name
        if self.path.split("?")[0] == "/":
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if not self.path.startswith("/openai/"):
            self.send_error(404)
            return
        super().do_GET()

    def translate_path(self, path):
        return str(SDK / path.split("?")[0].removeprefix("/openai/"))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def page_origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def tiny_engine():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=256)
    tok = ByteTokenizer(["<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>")
    return Engine(Transformer(cfg).eval(), tok, max_batch=2, kv_blocks=32, block_size=8)


def run_page(browser, page_origin, api):
    page = browser.new_page()
    sent = []
    page.on("request", lambda r: sent.append(r.headers) if r.url.startswith(api) else None)
    page.goto(f"{page_origin}/?api={api}")
    page.wait_for_function("window.result !== undefined", timeout=60_000)
    result = page.evaluate("window.result")
    page.close()
    return result, sent


@pytest.mark.parametrize("allowed", [True, False])
def test_the_openai_npm_sdk_runs_in_a_page_from_an_allowed_origin(browser, page_origin,
                                                                   allowed):
    origins = [page_origin] if allowed else ["http://127.0.0.1:1"]
    app = create_app(tiny_engine(), "tiny", api_key="sesame", cors_origins=origins)
    with BackgroundServer(app) as srv:
        result, sent = run_page(browser, page_origin, srv.url)
    if not allowed:  # the preflight is not granted: fetch fails, the SDK says so
        assert "error" in result and "Connection error" in result["error"], result
        return
    assert "error" not in result, result
    assert result["tokens"] == 5 and result["text"] and result["streamed"] == result["text"]
    # what the SDK sent: its own headers and the key, so the preflight had to grant them
    posts = [h for h in sent if "authorization" in h]
    assert posts and all(h["authorization"] == "Bearer sesame" for h in posts)
    assert {"x-stainless-lang", "x-stainless-package-version", "x-stainless-retry-count"} \
        <= posts[0].keys()
