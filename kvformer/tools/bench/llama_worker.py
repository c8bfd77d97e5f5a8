"""llama.cpp's side of `kvformer bench` (llama-cpp-python), in a process that never imports
torch, so that its memory is llama.cpp's own (torch alone is ~230 MB): ``python -m
kvformer.tools.bench.llama_worker`` reads a JSON spec on stdin and prints one JSON line, as
``kvformer.tools.bench.workers`` does for kvformer and transformers (the tasks are described
there). Also the helpers both kinds of worker share."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from kvformer.tools.timing import seconds, stream_rate

CONTEXT_NEW = 64  # tokens decoded after the long prompts


def llama_cpp_info() -> dict | None:
    """llama-cpp-python's version and the SIMD its llama.cpp was built with, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return {"version": llama_cpp.__version__, "system_info": " ".join(info.split())}


def llama_cpp(spec: dict) -> dict:
    from llama_cpp import Llama

    ids, n, task = spec["ids"], spec["new_tokens"], spec["task"]
    longest = max(len(ids.get(k, ())) for k in ("long", "ctx1k", "ctx4k", "text"))
    n_ctx = {"memory": len(ids["short"]) + n, "quality": len(ids["text"])}.get(
        task, longest + CONTEXT_NEW)
    n_ctx = 256 * math.ceil((n_ctx + 8) / 256)
    base = own_rss()
    t = time.perf_counter()
    llm = Llama(model_path=spec["model"], n_threads=spec["threads"],
                n_threads_batch=spec["threads"], n_ctx=n_ctx, n_batch=512, verbose=False,
                logits_all=task == "quality")
    out: dict = {"load": time.perf_counter() - t}

    def decode(prompt, count):
        llm.reset()
        return stream_rate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), count)

    if task == "memory":
        decode(ids["short"], n)
        return {"rss_base": base}
    if task == "quality":
        text = ids["text"]
        llm.reset()
        llm.eval(text)
        logits = np.asarray(llm.scores[:len(text) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll = -logp[np.arange(len(text) - 1), text[1:]].mean()
        return {"ppl": float(math.exp(nll))}

    def prefill(tokens):
        llm.reset()
        return len(tokens) / seconds(lambda: llm.eval(tokens))[0]

    out["kernels"] = llama_cpp_info()["system_info"]
    prefill(ids["long"][:64])
    out["prefill"] = prefill(ids["long"])
    decode(ids["short"], 8)
    out["decode"] = decode(ids["short"], n)
    for key in ("ctx1k", "ctx4k"):
        if key in ids:
            out[key] = decode(ids[key], CONTEXT_NEW)
    return out


# --------------------------------------------------------------------------- transformers
def own_rss() -> float | None:
    """This process's resident memory now, in MB (VmRSS)."""
    return _status("VmRSS:")


def own_peak_rss() -> float | None:
    """This process's peak resident memory in MB (VmHWM: its own address space since exec).
    The ru_maxrss the parent gets from wait4 is not that: Linux carries the parent's peak
    into a forked child, so a child of a 800 MB parent reports at least 800 MB."""
    return _status("VmHWM:")


def _status(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(worker: Callable[[dict], dict]) -> None:
    """A worker process: the spec from stdin, the result (with this process's peak RSS) as
    one JSON line on stdout."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = worker(json.loads(sys.stdin.read()))
    result["own_peak_rss"] = own_peak_rss()
    print(json.dumps(result))


if __name__ == "__main__":
    main(llama_cpp)
