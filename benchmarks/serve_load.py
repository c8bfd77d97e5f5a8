"""Load benchmark for `kvformer serve`: throughput and time to first token vs. concurrency.

Starts the server in a subprocess (so the client does not compete with it for the GIL),
then for each concurrency level C runs C streaming clients at once, each sending its
requests one after another, and reports

    total output tokens/s = completion tokens of the level / wall time of the level
    TTFT p50 / p99        = request sent -> first content chunk received
    ITL p50               = gap between content chunks of one stream
    SSE events            = "data:" lines received, [DONE] included

Every request is a chat completion with ``temperature 0`` and ``ignore_eos`` (so each
makes exactly --max-tokens tokens); prompts differ per request.

The reference, in the same run: what ``kvformer generate`` does in a process of its own
(the same model and dtype, the first prompt through the chat template, --max-tokens
greedy tokens with no stop token, prefill included), as tokens/s; "vs generate" is each
level's throughput over it.

With ``--kv-dtype bf16,int8`` (a list), the whole run is repeated with a server of each KV
dtype, and a last table sets their KV pools side by side as /metrics reports them: with
the default pool size (the bytes of --max-batch x 2,048 tokens in the activations' dtype),
the same memory holds ~1.9x the tokens as int8 rows.

    python benchmarks/serve_load.py                      # SmolLM2-135M, C = 1, 4, 16
    python benchmarks/serve_load.py --kv-dtype bf16,int8 # the KV pool in bf16, then int8
    python benchmarks/serve_load.py --url http://127.0.0.1:8000   # a server already up
    python benchmarks/serve_load.py --activations int8   # server and generate: int8 into int4

With ``--against llama-server --llama-server PATH`` the same clients drive llama.cpp's
``llama-server`` on the same GGUF file and threads, alternating with kvformer at each level
(C = 1, 4, 16, 64 by default): llama-server is restarted per level with ``-np C`` parallel
slots and continuous batching, and a context of C x --llama-ctx-per-slot tokens. Each line
names the engine; the table sets the two side by side with kvformer's ratio, and the chart
plots both. Without the binary, that engine is skipped with a line saying so. The prompts
then vary in length (a story request after 0-4 sentences of context).

    python benchmarks/serve_load.py --against llama-server --threads 1 \
        --llama-server /path/to/llama.cpp/build/bin/llama-server --chart docs/img/x.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOPICS = ["the sea", "a lighthouse", "mountains", "a robot", "the moon", "a library", "rain",
          "a garden", "trains", "a city at night", "winter", "a violin", "bees", "the desert",
          "a bridge", "clocks", "an island", "a market", "snow", "the wind"]


CONTEXT = ["I am writing a collection of stories for children.",
           "Each story should be gentle and end on a hopeful note.",
           "Please keep the sentences short and the words simple.",
           "The reader is about seven years old and loves animals.",
           "Use one named character and describe one small adventure."]
VARIED = False  # --against: prompts of varied lengths


def prompt(i: int) -> str:
    ask = f"Write a short story about {TOPICS[i % len(TOPICS)]} (request {i})."
    if VARIED:
        return " ".join([*CONTEXT[:(i * 3) % (len(CONTEXT) + 1)], ask])
    return ask


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt(i)}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    stamps: list[float] = []
    usage = None
    events = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk.get("timings"):  # llama-server without include_usage support
                usage = {"completion_tokens": chunk["timings"].get("predicted_n", 0)}
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    stamps.append(now)
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(stamps)
    return {"ttft": (first or end) - start, "tokens": tokens,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "seconds": end - start,
            "events": events}


async def level(url: str, model: str, concurrency: int, per_stream: int,
                max_tokens: int, offset: int) -> dict:
    # --against: a new connection per request, for both servers alike (llama-server closes
    # a kept-alive connection after some requests, racing the client's next one on it)
    limits = httpx.Limits(max_connections=concurrency + 4,
                          max_keepalive_connections=0 if VARIED else None)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, model, offset, 4)  # warm-up, not counted

        async def stream(s: int) -> list[dict]:
            return [await one_request(client, model, offset + 1 + s * per_stream + r,
                                      max_tokens) for r in range(per_stream)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(stream(s) for s in range(concurrency)))
                   for r in rs]
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens,
            "events": sum(r["events"] for r in results), "seconds": wall,
            "tokens_per_s": tokens / wall,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
            "itl_p50": percentile(itl, 0.5), "itl_p99": percentile(itl, 0.99)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pool_info(url: str) -> dict:
    """The KV pool as /metrics reports it: dtype, bytes, token slots, bytes per token."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for key in ("kvformer_kv_cache_bytes", "kvformer_kv_cache_tokens",
                    "kvformer_kv_bytes_per_token"):
            if line.startswith(key + "{"):
                out["dtype"] = line.split('dtype="', 1)[1].split('"', 1)[0]
                out[key.removeprefix("kvformer_kv_")] = int(float(line.rsplit(" ", 1)[1]))
    return out


def start_server(args, kv_dtype: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-c",
           "import sys; from kvformer.cli.serve import main; sys.exit(main())",
           "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.max_batch), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if kv_dtype:
        cmd += ["--kv-dtype", kv_dtype]
    if args.activations:
        cmd += ["--activations", args.activations]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up in 300 s")
        time.sleep(0.5)


def wait_up(proc: subprocess.Popen, url: str, what: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{what} did not come up in 300 s")
        time.sleep(0.5)


def start_llama_server(args, gguf: str, slots: int) -> tuple[subprocess.Popen, str]:
    """llama.cpp's server on ``gguf``: ``slots`` parallel sequences, continuous batching,
    the same threads as kvformer (generation and batch), ``slots`` x --llama-ctx-per-slot
    tokens of context, its web UI and logs off."""
    port = free_port()
    threads = str(args.threads or os.cpu_count() or 1)
    cmd = [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
           "-t", threads, "-tb", threads, "-np", str(slots), "--cont-batching",
           "-c", str(slots * args.llama_ctx_per_slot), "--log-disable"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_up(proc, url, "llama-server")
    return proc, url


def llama_server_version(path: str) -> str:
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("version")]
    return lines[0].split(":", 1)[1].strip() if lines else "unknown"


def kvformer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("kvformer")
    except PackageNotFoundError:
        release = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return f"{release} ({commit})" if commit else release


def cpu_flags() -> str:
    """The vector extensions that matter to both engines, as /proc/cpuinfo lists them."""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(line.split(":", 1)[1].split())
    names = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "amx_tile", "amx_int8"]
    return " ".join(n for n in names if n in have) or "none of avx2/avx512"


def gguf_path(model: str) -> str | None:
    """The GGUF file that ``model`` names (``default``: the shipped SmolLM2), or None."""
    if model == "default":
        from kvformer.formats.load import default_model_path

        return str(default_model_path())
    return model if model.endswith(".gguf") and Path(model).is_file() else None


def run_against(args) -> int:
    """kvformer and llama-server on the same GGUF, level by level, alternating."""
    global VARIED
    VARIED = True
    gguf = gguf_path(args.model)
    if gguf is None:
        raise SystemExit(f"--against llama-server needs a GGUF file (got --model {args.model})")
    args.model = gguf
    llama = args.llama_server
    if llama and not (Path(llama).is_file() and os.access(llama, os.X_OK)):
        print(f"llama-server: {llama} is not an executable file: skipping that engine",
              flush=True)
        llama = None
    elif not llama:
        print("llama-server: no --llama-server PATH given: skipping that engine", flush=True)
    from kvformer.runtime.native import kernel_path

    load_before = os.getloadavg()[0]
    versions = {"kvformer": kvformer_version()}
    if llama:
        versions["llama-server"] = llama_server_version(llama)
    threads = args.threads or os.cpu_count() or 1
    print(f"model {gguf}; {threads} thread(s) per engine; kvformer {versions['kvformer']}"
          + (f", llama-server {versions['llama-server']}" if llama else ""), flush=True)
    rows: dict[str, list[dict]] = {"kvformer": [], "llama-server": []}
    proc, url = start_server(args)
    try:
        offset = 0
        for c in args.concurrency:
            per_stream = max(1, -(-args.requests // c))
            engines = [("kvformer", url)]
            lproc = None
            if llama:
                lproc, lurl = start_llama_server(args, gguf, c)
                engines.append(("llama-server", lurl))
            try:
                for name, base in engines:  # the same requests for both
                    served = httpx.get(base + "/v1/models").json()["data"][0]["id"]
                    row = asyncio.run(level(base, served, c, per_stream, args.max_tokens,
                                            offset))
                    rows[name].append(row)
                    print(f"{name:12s} C={c:3d}: {row['tokens']:5d} tokens in "
                          f"{row['seconds']:6.1f} s = {row['tokens_per_s']:7.1f} tok/s; TTFT "
                          f"p50 {row['ttft_p50']:.2f} s, p99 {row['ttft_p99']:.2f} s; ITL p50 "
                          f"{row['itl_p50'] * 1000:.0f} ms, p99 {row['itl_p99'] * 1000:.0f} ms",
                          flush=True)
            finally:
                if lproc is not None:
                    lproc.terminate()
                    lproc.wait(30)
            offset += 1 + c * per_stream
    finally:
        proc.terminate()
        proc.wait(30)

    def cell(r, key, scale=1.0, fmt="{:.2f}"):
        return fmt.format(r[key] * scale) if r else "-"

    print("\n| streams | kvformer tok/s | llama-server tok/s | ratio | TTFT p50 (s) k / l | "
          "TTFT p99 (s) k / l | ITL p50 (ms) k / l | ITL p99 (ms) k / l |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, c in enumerate(args.concurrency):
        k = rows["kvformer"][i]
        lr = rows["llama-server"][i] if rows["llama-server"] else None
        ratio = f"{k['tokens_per_s'] / lr['tokens_per_s']:.2f}x" if lr else "-"
        ms = "{:.0f}"
        print(f"| {c} | {k['tokens_per_s']:.1f} | {cell(lr, 'tokens_per_s', fmt='{:.1f}')} | "
              f"{ratio} | {k['ttft_p50']:.2f} / {cell(lr, 'ttft_p50')} | "
              f"{k['ttft_p99']:.2f} / {cell(lr, 'ttft_p99')} | "
              f"{k['itl_p50'] * 1000:.0f} / {cell(lr, 'itl_p50', 1000, ms)} | "
              f"{k['itl_p99'] * 1000:.0f} / {cell(lr, 'itl_p99', 1000, ms)} |")
    machine = (f"{cpu_name()} ({cpu_flags()}), {os.cpu_count()} CPUs, load average "
               f"{load_before:.1f} before the run and {os.getloadavg()[0]:.1f} after; "
               f"kvformer kernels: {kernel_path()}; {threads} thread(s) per engine")
    print(f"\n{machine}")
    info = {"model": gguf, "max_tokens": args.max_tokens, "machine": machine,
            "versions": versions, "rows": rows,
            "command": " ".join(["python", "benchmarks/serve_load.py", *sys.argv[1:]])}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=2) + "\n")
    if args.chart:
        chart_against(rows, args.concurrency, args.chart,
                      f"{Path(gguf).name}, {threads} thread(s), {args.max_tokens} tokens per "
                      f"request, streaming; load average {load_before:.1f} before the run")
    return 0


def chart_against(rows: dict, levels: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, rs), mark in zip(rows.items(), ("o-", "s--")):
        if not rs:
            continue
        ax1.plot(levels, [r["tokens_per_s"] for r in rs], mark, label=name)
        ax2.plot(levels, [r["ttft_p99"] for r in rs], mark, label=name)
    for ax, label, what in ((ax1, "total output tokens / s", "throughput"),
                            (ax2, "seconds", "time to first token, p99")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.set_title(what)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


REFERENCE = """
import sys, time
from kvformer.runtime.generation import generate
from kvformer.formats.load import load
model, tok = load(sys.argv[1], dtype=None if sys.argv[2] == "-" else sys.argv[2], progress=False)
ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": sys.argv[3]}]),
                 add_special_tokens=False)
n = int(sys.argv[4])
generate(model, ids, 4)  # warm-up
best = 0.0
for _ in range(3):
    start = time.perf_counter()
    out = generate(model, ids, n)
    best = max(best, len(out) / (time.perf_counter() - start))
print(best)
"""


def reference_rate(args) -> float:
    """Tokens/s of kvformer.generate alone, as `kvformer generate` runs it (best of 3)."""
    dtype = args.dtype or "auto"
    env = {**os.environ, **({"KVFORMER_ACTIVATIONS": args.activations}
                            if args.activations else {})}
    done = subprocess.run([sys.executable, "-c", REFERENCE, args.model, dtype, prompt(0),
                           str(args.max_tokens)], capture_output=True, text=True, check=True,
                          env=env)
    return float(done.stdout.strip().splitlines()[-1])


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["concurrency"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    bars = ax1.bar(labels, [r["tokens_per_s"] for r in rows], color="#4C72B0")
    base = rows[0]["tokens_per_s"]
    for bar, r in zip(bars, rows):
        ax1.annotate(f"{r['tokens_per_s']:.1f}\n({r['tokens_per_s'] / base:.1f}x)",
                     (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=9)
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("total output tokens / s")
    ax1.set_title("throughput")
    ax1.margins(y=0.25)
    x = range(len(rows))
    ax2.plot(x, [r["ttft_p50"] for r in rows], "o-", label="p50")
    ax2.plot(x, [r["ttft_p99"] for r in rows], "s--", label="p99")
    ax2.set_xticks(list(x), labels)
    ax2.set_xlabel("concurrent streams")
    ax2.set_ylabel("seconds")
    ax2.set_title("time to first token")
    ax2.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def run_levels(args, kv_dtype: str | None) -> tuple[str, dict, list[dict]]:
    """Start a server (KV dtype ``kv_dtype``) unless --url names one, run every concurrency
    level against it: (model id, its KV pool, a row per level)."""
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args, kv_dtype)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        pool = pool_info(url)
        print(f"KV pool: {pool.get('dtype')}, {pool.get('cache_tokens', 0):,} token slots in "
              f"{pool.get('cache_bytes', 0) / 2**20:.0f} MiB "
              f"({pool.get('bytes_per_token', 0):,} bytes per token)", flush=True)
        rows, offset = [], 0
        for c in args.concurrency:
            per_stream = max(1, -(-args.requests // c))
            row = level(url, model, c, per_stream, args.max_tokens, offset)
            row = asyncio.run(row)
            offset += 1 + c * per_stream
            rows.append(row)
            print(f"C={c:3d}: {row['requests']:3d} requests, {row['tokens']:5d} tokens in "
                  f"{row['seconds']:6.1f} s = {row['tokens_per_s']:7.1f} tok/s; TTFT p50 "
                  f"{row['ttft_p50']:.2f} s, p99 {row['ttft_p99']:.2f} s; ITL p50 "
                  f"{row['itl_p50'] * 1000:.0f} ms; {row['events']} SSE events", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    return model, pool, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--url", default=None, help="benchmark a running server instead")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="levels (default 1 4 16; with --against, 1 4 16 64)")
    p.add_argument("--requests", type=int, default=8,
                   help="requests per level, at least one per stream (default 8)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default=None, help="the server's --dtype (default: its own)")
    p.add_argument("--activations", default=None, choices=["int16", "int8"],
                   help="the server's --activations, and generate's alike (default: theirs)")
    p.add_argument("--kv-dtype", default=None,
                   help="the server's --kv-dtype, or a comma-separated list to run with each "
                        "and compare their KV pools (default: the server's own)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--chart", type=Path, default=None, help="write a PNG chart here")
    p.add_argument("--no-reference", action="store_true",
                   help="skip measuring kvformer generate alone")
    p.add_argument("--against", choices=["llama-server"], default=None,
                   help="drive llama.cpp's server on the same GGUF too, level by level")
    p.add_argument("--llama-server", default=None, metavar="PATH",
                   help="the llama-server binary (built from llama.cpp's sources)")
    p.add_argument("--llama-ctx-per-slot", type=int, default=512,
                   help="llama-server's context per parallel slot (default 512)")
    args = p.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = [1, 4, 16, 64] if args.against else [1, 4, 16]
    if args.against:
        return run_against(args)

    load_before = os.getloadavg()[0]
    ref = None
    if not args.no_reference and args.url is None:
        ref = reference_rate(args)
        print(f"kvformer generate alone: {ref:.1f} tok/s", flush=True)
    kvs = [k.strip() for k in (args.kv_dtype or "").split(",") if k.strip()] or [None]
    runs = []
    for kv in kvs:
        runs.append(run_levels(args, kv))
    model, pool, rows = runs[0]
    if len(runs) > 1:
        first = runs[0][1]
        print("\n| KV dtype | KV pool (MiB) | token slots | bytes / token | tokens vs "
              f"{first.get('dtype')} | " + " | ".join(f"tok/s at C={c}"
                                                      for c in args.concurrency) + " |")
        print("|---|---:|---:|---:|---:|" + "---:|" * len(args.concurrency))
        for _, pl, rs in runs:
            print(f"| {pl.get('dtype')} | {pl['cache_bytes'] / 2**20:.0f} | "
                  f"{pl['cache_tokens']:,} | {pl['bytes_per_token']:,} | "
                  f"{pl['cache_tokens'] / first['cache_tokens']:.2f}x | "
                  + " | ".join(f"{r['tokens_per_s']:.1f}" for r in rs) + " |")

    base = rows[0]["tokens_per_s"]
    vs = " vs generate |" if ref else ""
    print("\n| concurrent streams | requests | output tokens | total tok/s | vs 1 stream |"
          f"{vs} TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) |")
    print("|---:|---:|---:|---:|---:|" + ("---:|" if ref else "") + "---:|---:|---:|")
    for r in rows:
        ratio = f" {r['tokens_per_s'] / ref:.2f}x |" if ref else ""
        print(f"| {r['concurrency']} | {r['requests']} | {r['tokens']} | "
              f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.1f}x |{ratio} "
              f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['itl_p50'] * 1000:.0f} |")
    machine = (f"{cpu_name()}, {os.cpu_count()} CPUs, load average {load_before:.1f} before "
               f"the run and {os.getloadavg()[0]:.1f} after")
    print(f"\n{machine}")
    info = {"model": model, "max_tokens": args.max_tokens, "machine": machine, "rows": rows,
            "kv_pools": [{**pl, "rows": rs} for _, pl, rs in runs],
            "generate_tokens_per_s": ref,
            "command": " ".join(["python", "benchmarks/serve_load.py", *(argv or sys.argv[1:])])}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=2) + "\n")
    if args.chart:
        chart(rows, args.chart, f"kvformer serve, {model}, {args.max_tokens} tokens per "
                                f"request, greedy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
