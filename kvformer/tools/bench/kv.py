"""What each KV-cache dtype costs and buys, measured on one model.

Per KV dtype (``kvformer.kv.formats``):

    bytes       per token (K and V of every layer, scales included): ``kv_cache_bytes``
    perplexity  on a fixed English text of 1,000+ tokens (``texts.py``), through prefill
                (one forward: every token attends to the stored, quantized, K/V) and, for
                ``kvformer bench --kv``, one token at a time through the decode step
    agreement   greedy decoding against the bf16 cache: the bf16 cache's greedy tokens
                (256 per prompt) are fed one at a time through a cache of this dtype, and
                each position's argmax is compared with the bf16 token there: the share that
                agree, and how many tokens came out identical before the first difference
                (what free-running greedy decoding would have shared)
    speed       decode tokens/s with 2,048 tokens cached, the dtypes' steps interleaved one
                by one in the same process so a shared machine's noise falls on all alike
                (10th-percentile step time); the ratio to bf16's comes from that one run

``kvformer bench --kv`` prints the table and writes docs/kv-cache.md; ``kvformer explain
docs`` draws the bytes beside the quality in docs/how-it-decodes.md.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from kvformer.formats.load import load
from kvformer.runtime import native
from kvformer.runtime.generation import perplexity
from kvformer.runtime.step import for_model
from kvformer.tools.texts import ENGLISH, MORE_ENGLISH
from kvformer.tools.timing import seconds

MEASURED = ("fp32", "bf16", "int8", "int4")
REFERENCE = "bf16"
KV_TEXT = ENGLISH + "\n" + MORE_ENGLISH
AGREE_TOKENS = 256
SPEED_CONTEXT = 2048
SPEED_STEPS = 96
SPEED_QUANTILE = 0.1  # of step times: a shared machine only ever adds time to a step
CHAT_PROMPT = "Explain, step by step, how a printing press turns a page of text into a book."


def text_ids(tok) -> list[int]:
    return tok.encode(KV_TEXT)


def prompts(tok) -> list[list[int]]:
    """The prompts greedy decoding starts from: the text's first 64 tokens, and a chat
    question (where the tokenizer has a template)."""
    out = [text_ids(tok)[:64]]
    try:
        chat = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}],
                                       add_generation_prompt=True)
        out.append(tok.encode(chat, add_special_tokens=False))
    except Exception:  # no chat template: the continuation alone
        pass
    return out


@torch.inference_mode()
def forced_argmax(model, prompt: list[int], tokens: list[int], kv: str) -> list[int]:
    """Greedy choices at each position while ``tokens`` are fed after ``prompt``, one at a
    time through the decode step of a ``kv`` cache: [argmax after prompt, after tokens[0],
    ...] (len(tokens) of them)."""
    executor = for_model(model)
    cache = model.new_cache(1, len(prompt) + len(tokens), kv)
    logits = executor(torch.tensor([prompt]), cache=cache, last_only=True)[0, -1]
    out = []
    for t in tokens:
        out.append(int(logits.argmax()))
        logits = executor(torch.tensor([[t]]), cache=cache)[0, -1]
    return out


@torch.inference_mode()
def greedy(model, prompt: list[int], n: int, kv: str) -> list[int]:
    """n greedy tokens after ``prompt`` through a ``kv`` cache (no stop tokens)."""
    executor = for_model(model)
    cache = model.new_cache(1, len(prompt) + n, kv)
    logits = executor(torch.tensor([prompt]), cache=cache, last_only=True)[0, -1]
    out: list[int] = []
    for i in range(n):
        out.append(int(logits.argmax()))
        if i + 1 < n:
            logits = executor(torch.tensor([[out[-1]]]), cache=cache)[0, -1]
    return out


def agreement(reference: list[int], chosen: list[int]) -> tuple[float, int]:
    """(share of positions where the choices agree, positions before the first that
    differs)."""
    same = [a == b for a, b in zip(reference, chosen)]
    first = same.index(False) if False in same else len(same)
    return sum(same) / len(same), first


@torch.inference_mode()
def decode_speed(model, kvs, context: int = SPEED_CONTEXT, steps: int = SPEED_STEPS,
                 seed: int = 0) -> dict[str, float]:
    """Tokens/s of one decode step per KV dtype with ``context`` tokens cached: one cache
    each, filled from the same prompt, then the dtypes step in turn, one token at a time,
    so that the load of a shared machine falls on all of them alike. The figure is the
    step time at SPEED_QUANTILE (the 10th percentile): other processes only ever make a
    step slower, by a lot on 2 shared cores (the median moved 2x between runs), so the
    faster steps are the ones that measure the code."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context), generator=gen)
    executor = for_model(model)
    caches = {}
    for kv in kvs:
        caches[kv] = model.new_cache(1, context + steps + 8, kv)
        executor(prompt, cache=caches[kv], last_only=True)
    token = torch.tensor([[int(prompt[0, -1])]])
    times: dict[str, list[float]] = {kv: [] for kv in kvs}
    for i in range(steps + 4):
        for kv in kvs:
            took = seconds(lambda kv=kv: executor(token, cache=caches[kv]))[0]
            if i >= 4:  # the first steps warm up
                times[kv].append(took)
    return {kv: 1.0 / statistics.quantiles(ts, n=100)[int(SPEED_QUANTILE * 100) - 1]
            for kv, ts in times.items()}


def measure(model, tok, kvs=MEASURED, decode_ppl: bool = True, speed: bool = True,
            new_tokens: int = AGREE_TOKENS, say=None) -> dict:
    """Every figure of this module's docstring for ``model`` and each KV dtype in ``kvs``
    (the reference, bf16, is measured too)."""
    kvs = list(dict.fromkeys([REFERENCE, *kvs]))
    say = say or (lambda text: None)
    cfg = model.cfg
    ids = text_ids(tok)
    starts = prompts(tok)
    refs = [greedy(model, p, new_tokens, REFERENCE) for p in starts]
    rows: dict[str, dict] = {}
    for kv in kvs:
        row = {"bytes_per_token": cfg.kv_cache_bytes(1, 1, model.kv_format(kv)),
               "ppl": perplexity(model, ids, kv_dtype=kv)}
        if decode_ppl:
            row["ppl_decode"] = perplexity(model, ids, kv_dtype=kv, token_by_token=True)
        agree, firsts = [], []
        for p, ref in zip(starts, refs):
            a, first = agreement(ref, forced_argmax(model, p, ref, kv))
            agree.append(a)
            firsts.append(first)
        row["agree"] = sum(agree) / len(agree)
        row["first_diff"] = firsts
        rows[kv] = row
        say(f"{kv}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if speed:
        for kv, rate in decode_speed(model, kvs).items():
            rows[kv]["decode"] = rate
    return {"rows": rows, "text_tokens": len(ids), "new_tokens": new_tokens,
            "prompts": len(starts), "context": SPEED_CONTEXT}


# --------------------------------------------------------------------------- the report
def table(result: dict) -> list[str]:
    """The markdown table of ``measure``'s result."""
    rows = result["rows"]
    ref = rows[REFERENCE]
    decode_ppl = all("ppl_decode" in r for r in rows.values())
    speed = all("decode" in r for r in rows.values())
    head = ["KV dtype", "bytes / token", "bf16's bytes / these",
            f"perplexity ({result['text_tokens']:,} tokens)", "vs bf16"]
    if decode_ppl:
        head += ["perplexity, decode step", "vs bf16"]
    head += [f"greedy agreement ({result['prompts']} × {result['new_tokens']} tokens)",
             "identical before the first difference"]
    if speed:
        head += [f"decode tok/s, {result['context']:,} cached", "vs bf16"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for kv, r in rows.items():
        cells = [f"`{kv}`", f"{r['bytes_per_token']:,}",
                 f"{ref['bytes_per_token'] / r['bytes_per_token']:.2f}×",
                 f"{r['ppl']:.3f}", f"{(r['ppl'] / ref['ppl'] - 1) * 100:+.2f} %"]
        if decode_ppl:
            cells += [f"{r['ppl_decode']:.3f}",
                      f"{(r['ppl_decode'] / ref['ppl_decode'] - 1) * 100:+.2f} %"]
        cells += [f"{r['agree'] * 100:.1f} %", " / ".join(str(n) for n in r["first_diff"])]
        if speed:
            cells += [f"{r['decode']:.1f}", f"{r['decode'] / ref['decode']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(result: dict, model_name: str, info: dict) -> str:
    rows = result["rows"]
    lines = [
        "# The KV cache in fp32, bf16, int8 and int4", "",
        "Generated by `kvformer bench --kv` (kvformer/kvbench.py) on "
        f"`{model_name}` ({info['weights']} weights, {info['kernels']} kernels, activations "
        f"{info['act']}). KV rows: `int8` one int8 per number and a bf16 scale per token and "
        "head; `int4` groups of 32 numbers with a bf16 (d, m) pair each "
        "(`kvformer/kvquant.py`); the native decode step dequantizes them inside its "
        "attention kernel.", ""]
    lines += table(result)
    lines += ["",
              "- **Perplexity**: one forward over the whole text (prefill: every token "
              "attends to the stored K/V, quantized as the cache stores them)"
              + (", and the text fed one token at a time through the decode step." if
                 all("ppl_decode" in r for r in rows.values()) else "."),
              f"- **Greedy agreement**: the bf16 cache's greedy tokens ({result['new_tokens']}"
              f" after each of {result['prompts']} prompts: a continuation of the text and "
              "a chat question) fed one at a time through a cache of each dtype; the share of "
              "positions where that cache's argmax is the same token, and the positions "
              "before the first that is not (per prompt): greedy decoding with that cache "
              "gives exactly the bf16 tokens up to there.",
              f"- **Decode speed**: {result['context']:,} tokens cached (a random prompt), "
              f"the dtypes' steps interleaved one token at a time in one process, "
              f"{SPEED_STEPS} steps each; the figure is each dtype's 10th-percentile step time "
              "(other processes only ever slow a step down); the ratios come from that one "
              "run. "
              f"Machine: {info['machine']}, {info['threads']} threads, load average "
              f"{info['load'][0]:.2f} before and {info['load'][1]:.2f} after "
              "(shared with other processes: absolute figures move between runs, the "
              "ratios much less).", ""]
    return "\n".join(lines)


def run(args) -> int:
    """``kvformer bench --kv``: measure, print, write ``args.out`` (docs/kv-cache.md)."""
    kvs = [k.strip() for k in (args.kv_dtype or ",".join(MEASURED)).split(",") if k.strip()]
    for kv in kvs:
        if kv not in MEASURED:
            raise ValueError(f"--kv-dtype {kv!r} is not one of {', '.join(MEASURED)}")
    dtype = args.dtype if args.dtype in ("fp32", "bf16", "int8", "int4") else "auto"
    if args.threads:
        torch.set_num_threads(args.threads)
    before = os.getloadavg()
    model, tok = load(args.model, dtype=dtype, progress=False)
    result = measure(model, tok, kvs, decode_ppl=True, speed=True,
                     say=lambda text: print(text, file=sys.stderr, flush=True))
    cpu = native.cpuinfo("model name").partition(":")[2].strip() or platform.processor()
    info = {"weights": getattr(model, "mode", dtype), "act": str(model.dtype).split(".")[-1],
            "kernels": for_model(model).isa or "torch", "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {cpu or '?'}",
            "load": (before[0], os.getloadavg()[0])}
    text = report(result, Path(getattr(model, "source", args.model)).name, info)
    print(text)
    for kv in kvs:
        if kv != REFERENCE:
            rate = result["rows"][kv]["decode"] / result["rows"][REFERENCE]["decode"]
            print(f"decode speed with {kv} KV / bf16 KV at {SPEED_CONTEXT:,} tokens cached: "
                  f"{rate:.2f}× (one run; the machine may be shared)", file=sys.stderr)
    if not args.no_write:
        out = Path(args.out if args.out != "docs/benchmarks.md" else "docs/kv-cache.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return 0
