"""The same workloads on two checkouts of kvformer, interleaved: is a change slower?

Runs each workload through the public API and the command line of each tree (the tree comes
first on PYTHONPATH; the venv and the native build cache are shared, each tree builds its own
kernels from its own sources): in each of ``--rounds`` rounds every workload runs on both
trees back to back, which one first alternating, so that a busy shared machine slows both
alike. Prints each figure's median per tree and the ratio
(this tree / the other).

    git worktree add /tmp/before <commit>
    python benchmarks/compare_trees.py --before /tmp/before --rounds 4

Workloads, on the default model (SmolLM2-135M Q4_1, ``dtype="auto"``: int4), torch's
default threads:

    decode b1      128 greedy tokens after a chat prompt, ``kvformer.generate``
    decode b16     16 rows of the same prompt, 64 tokens each (total tokens/s)
    prefill 512    a 512-token prompt to its first token (prompt tokens/s)
    generate CLI   ``python -m kvformer generate -n 128 --stats`` (its own tokens/s figure)
    serve 1 stream ``python -m kvformer serve``, one streamed chat completion of 128 tokens
                   (``ignore_eos``), tokens/s from the request to the last chunk
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent.parent
PROMPT = "Explain what a KV cache is and why it makes decoding faster."
TEXT = ("The history of the printing press is a history of many small improvements. "
        "Each printer learned from the last, and the craft spread from town to town. ")

WORKER = r"""
import json, sys, time
import kvformer
model, tok = kvformer.load("default", dtype="auto", progress=False)
ids = tok.encode_chat([{"role": "user", "content": PROMPT}])
kvformer.generate(model, ids, 8)
t = time.perf_counter(); kvformer.generate(model, ids, 128)
b1 = 128 / (time.perf_counter() - t)
kvformer.generate(model, [ids] * 16, 4)
t = time.perf_counter(); kvformer.generate(model, [ids] * 16, 64)
b16 = 16 * 64 / (time.perf_counter() - t)
long = (tok.encode(TEXT) * 64)[:512]
kvformer.generate(model, long[:64], 1)
times = []
for _ in range(2):
    t = time.perf_counter(); kvformer.generate(model, long, 1)
    times.append(time.perf_counter() - t)
best = min(times)
print(json.dumps({"decode b1": b1, "decode b16": b16, "prefill 512": 512 / best}))
"""


def env_for(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


def api(tree: Path) -> dict:
    code = f"PROMPT = {PROMPT!r}\nTEXT = {TEXT!r}\n" + WORKER
    out = subprocess.run([sys.executable, "-c", code], env=env_for(tree), cwd="/",
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli(tree: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "kvformer", "generate", "-n", "128", "--stats",
                          "--chat", PROMPT], env=env_for(tree), cwd="/",
                         capture_output=True, text=True, check=True)
    rate = re.search(r"([\d.]+) tokens/s", out.stderr)
    return {"generate CLI": float(rate.group(1))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(tree: Path) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvformer", "serve", "--port", str(port)],
                            env=env_for(tree), cwd="/", stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the server of {tree} did not start")
            time.sleep(0.3)
        body = {"model": "default", "stream": True, "temperature": 0, "max_tokens": 128,
                "ignore_eos": True, "messages": [{"role": "user", "content": PROMPT}]}
        rates = []
        for _ in range(2):  # the first one warms up
            start, chunks = time.perf_counter(), 0
            with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                              timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data:") and '"content"' in line:
                        chunks += 1
            rates.append(128 / (time.perf_counter() - start))
        return {"serve 1 stream": rates[-1]}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, type=Path, help="the other checkout")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    trees = {"this": HERE, "before": args.before.resolve()}
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for r in range(args.rounds):
        for w, work in enumerate((api, cli, serve)):
            # each workload on both trees back to back, the first one alternating, so that
            # what ran just before (and a machine that gets busier) falls on both alike
            order = list(trees) if (r + w) % 2 == 0 else list(trees)[::-1]
            for name in order:
                for key, value in work(trees[name]).items():
                    runs[name].setdefault(key, []).append(value)
        for name in trees:
            print(f"round {r + 1}, {name}: " + ", ".join(
                f"{k} {v[-1]:.1f}" for k, v in runs[name].items()), file=sys.stderr, flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    print(f"{args.rounds} interleaved rounds on {cpu}, {os.cpu_count()} CPUs; medians "
          "(min-max)\n")
    print("| workload | this tree | before | this / before |")
    print("| --- | --- | --- | --- |")
    for key in runs["this"]:
        a, b = runs["this"][key], runs["before"][key]
        print(f"| {key} | {statistics.median(a):.1f} ({min(a):.1f}-{max(a):.1f}) | "
              f"{statistics.median(b):.1f} ({min(b):.1f}-{max(b):.1f}) | "
              f"{statistics.median(a) / statistics.median(b):.3f} |")


if __name__ == "__main__":
    main()
