"""The worker side of `kvformer bench`: one task of one engine, in a fresh process.

``python -m kvformer.tools.bench.workers`` reads a JSON spec on stdin and prints one JSON line:

    engine  kvformer | llama.cpp | transformers
    task    speed    load time; prefill of a 512-token prompt; decode at batch 1 after a
                     16-token prompt and with 1,000 and 4,000 tokens already in the cache;
                     decode at batch 8; decode without a cache (kvformer, transformers)
            memory   load, then decode 128 tokens at batch 1 (what `kvformer generate` does):
                     the parent reads this process's peak RSS from the kernel; rss_base is
                     its resident memory just before the load (the engine's library loaded)
            quality  perplexity of the fixed text through prefill, and (kvformer) the same
                     text fed one token at a time through the decode step

Every workload is warmed up first; decode rates are taken between the first and the last
new token, so the prompt's prefill is not counted.
"""

from __future__ import annotations

import math
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvformer.formats.load import load
from kvformer.runtime import native
from kvformer.runtime.generation import generate_stream, perplexity
from kvformer.runtime.quant import act_dtype
from kvformer.runtime.step import for_model
from kvformer.tools.bench.llama_worker import CONTEXT_NEW, main, own_rss
from kvformer.tools.timing import seconds, stream_rate


def worker(spec: dict) -> dict:
    """kvformer's and transformers' tasks (llama.cpp's run in ``llama_worker``, a process
    without torch)."""
    torch.set_num_threads(spec["threads"])
    if spec["engine"] == "kvformer":
        return _kvformer(spec)
    return _transformers(spec)


# --------------------------------------------------------------------------- kvformer
def _kvformer(spec: dict) -> dict:
    ids, n = spec["ids"], spec["new_tokens"]
    if spec["task"] == "memory":
        native.available()  # built and loaded before the baseline, as llama.cpp's library
        out = {"rss_base": own_rss()}
        model, _ = load(spec["model"], dtype=spec["dtype"], progress=False,
                        kv_dtype=spec.get("kv_dtype", "auto"))
        stream_rate(generate_stream(model, ids["short"], n), n)
        return out
    if spec["task"] == "quality":
        model, _ = load(spec["model"], dtype=spec["dtype"], progress=False,
                        kv_dtype=spec.get("kv_dtype", "auto"))
        out = {"ppl": perplexity(model, ids["text"]),
               "ppl_decode": perplexity(model, ids["text"], token_by_token=True)}
        if spec.get("profile"):
            out["profile"] = profile_step(model, ids["short"])
        return out

    out: dict = {"native": native.available(),  # built (once) before the clock starts
                 "kernels": native.kernel_path(), "act": str(act_dtype()).split(".")[-1]}
    t = time.perf_counter()
    model, _ = load(spec["model"], dtype=spec["dtype"], progress=False,
                        kv_dtype=spec.get("kv_dtype", "auto"))
    out["load"] = time.perf_counter() - t
    long = torch.tensor([ids["long"]])

    executor = for_model(model)

    def prefill(tokens):
        with torch.inference_mode():
            cache = model.new_cache(1, tokens.shape[1])
            took = seconds(lambda: executor(tokens, cache=cache, last_only=True))[0]
            return tokens.shape[1] / took

    prefill(long[:, :64])
    out["prefill"] = prefill(long)
    for _ in generate_stream(model, ids["short"], 8):
        pass
    out["decode"] = stream_rate(generate_stream(model, ids["short"], n), n)
    for key in ("ctx1k", "ctx4k"):
        if key in ids:
            out[key] = stream_rate(generate_stream(model, ids[key], CONTEXT_NEW), CONTEXT_NEW)
    if "batch" in ids:
        for _ in generate_stream(model, ids["batch"], 8):
            pass
        out["batch"] = len(ids["batch"]) * stream_rate(generate_stream(model, ids["batch"], n), n)
    if spec.get("nocache"):
        nc = spec["nocache"]
        for _ in generate_stream(model, ids["short"], 4, use_cache=False):
            pass
        out["nocache"] = stream_rate(generate_stream(model, ids["short"], nc, use_cache=False), nc)
    out["decode_path"] = for_model(model).name
    return out


def profile_step(model, prompt: list[int], steps: int = 32) -> dict:
    """Per-token time of the native step by part and of Transformer.forward on the same
    cache, and torch.profiler's top operators of the forward."""
    tok = torch.tensor([[prompt[-1]]])
    fwd = type(model).forward.__get__(model)
    with torch.inference_mode():
        cache = model.new_cache(1, 512)
        model(torch.tensor([prompt]), cache=cache)
        start = cache.length + 100  # ~100 more tokens in the cache, as mid-generation
        cache.length = start

        def timed(f) -> float:  # ms per step, from `start` cached tokens on
            cache.length = start
            f(tok, cache)
            cache.length = start
            return sum(seconds(lambda: f(tok, cache), repeats=steps)) / steps * 1e3

        step = for_model(model).native
        result = {"len": start}
        if step is not None:
            torch.ops.kvformer_native.profile(True)
            result["native_ms"] = timed(step.decode)
            raw = torch.ops.kvformer_native.profile(False)
            names = ("weight matmuls", "LM head", "attention (incl. RoPE, cache writes)",
                     "norms, SiLU, residuals")
            result["parts"] = {k: v / raw[-1] / 1e6 for k, v in zip(names, raw[:4])}
            result["isa"] = step.isa
        result["forward_ms"] = timed(lambda t, c: fwd(t, cache=c))
        cache.length = start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(8):
                fwd(tok, cache=cache)
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        result["forward_top"] = [(e.key, e.count // 8, e.self_cpu_time_total / 8 / 1e3)
                                 for e in rows[:8]]
    return result


def _transformers(spec: dict) -> dict:
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    hf, ids, n = spec["hf"], spec["ids"], spec["new_tokens"]
    kwargs = {"gguf_file": hf["gguf_file"]} if "gguf_file" in hf else {}
    t = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(hf["dir"], dtype=torch.float32, **kwargs)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(hf["dir"], torch_dtype=torch.float32,
                                                     **kwargs)
    model.eval()
    out: dict = {"load": time.perf_counter() - t}
    if spec["task"] == "quality":
        with torch.inference_mode():
            text = torch.tensor([ids["text"]])
            logits = model(text).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, text[0, 1:])
        return {"ppl": math.exp(nll.item())}

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def gen(prompts, new, use_cache=True) -> float:
        x = torch.tensor(prompts)
        stamp = Stamp()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, use_cache=use_cache,
                           logits_processor=LogitsProcessorList([stamp]),
                           pad_token_id=model.config.eos_token_id)
        if len(stamp.times) != new:
            raise RuntimeError(f"expected {new} steps, got {len(stamp.times)}")
        return (new - 1) / (stamp.times[-1] - stamp.times[0])

    def prefill(tokens):
        with torch.inference_mode():
            took = seconds(lambda: model(tokens, use_cache=True, logits_to_keep=1))[0]
            return tokens.shape[1] / took

    if spec["task"] == "memory":
        gen([ids["short"]], n)
        return {}
    long = torch.tensor([ids["long"]])
    prefill(long[:, :64])
    out["prefill"] = prefill(long)
    gen([ids["short"]], 8)
    out["decode"] = gen([ids["short"]], n)
    for key in ("ctx1k", "ctx4k"):
        if key in ids:
            out[key] = gen([ids[key]], CONTEXT_NEW)
    if "batch" in ids:
        gen(ids["batch"], 8)
        out["batch"] = len(ids["batch"]) * gen(ids["batch"], n)
    if spec.get("nocache"):
        gen([ids["short"]], 4, use_cache=False)
        out["nocache"] = gen([ids["short"]], spec["nocache"], use_cache=False)
    return out


if __name__ == "__main__":
    main(worker)
