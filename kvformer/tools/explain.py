"""`kvformer explain`: the seed's claims measured, and docs/how-it-decodes.md rebuilt."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from kvformer.config import ModelConfig
from kvformer.formats.load import load, load_config
from kvformer.tools import pictures as P
from kvformer.tools.bench import kv as kvbench

ATTENTION_TEXT = "The cat sat on the mat because it was warm."
KV_SIZE_DTYPES = ("fp16", "int8", "int4")
CACHE_LENGTHS = (16, 64, 128, 256, 512, 1024)


def scaling(out: str | Path, model_name: str | None = "default"):
    stats = P.random_scaling_stats()
    model_entropy, label = None, ""
    if model_name:
        model, tok = load(model_name)
        ids = tok.encode(ATTENTION_TEXT * 3) if tok is not None else list(range(48))
        layers = P.record_attention(model, ids)
        model_entropy = P.model_entropy_per_head(layers, model.cfg.head_dim)
        label = Path(getattr(model, "source", model_name)).name
    path = P.plot_scaling(stats, out, model_entropy, label)
    return path, stats, model_entropy


def cache(out: str | Path, model_name: str = "default", lengths=CACHE_LENGTHS, report=None):
    model, _ = load(model_name)
    lengths = [n for n in lengths if n < model.cfg.max_seq_len]
    rows = P.time_per_token(model, lengths, report=report)
    path = P.plot_cache_timing(rows, out, Path(getattr(model, "source", model_name)).name)
    return path, rows


def run(topic: str, output: str | None, model_name: str = "default") -> int:
    if topic == "scaling":
        path, stats, _ = scaling(output or "scaling.png", model_name)
        for s in stats:
            print(f"d_k={s['d_k']:>5}  Var(q·k)={s['var_dot']:8.1f}  "
                  f"entropy unscaled={s['entropy_unscaled']:.3f}  "
                  f"scaled={s['entropy_scaled']:.3f} nats")
    elif topic == "cache":
        # each length as it is measured: the longest take most of the minute or two
        print(f"time per token at {', '.join(map(str, CACHE_LENGTHS))} tokens, with and "
              "without the KV cache (the longest lengths take longest):", flush=True)
        path, _ = cache(output or "cache.png", model_name, report=lambda r: print(
            f"length {r['length']:>5}: with cache {1000 * r['with_cache_s']:7.2f} ms, "
            f"without {1000 * r['without_cache_s']:8.2f} ms per token", flush=True))
    else:
        path = write_docs(Path(output or "docs"), model_name)
    print(f"wrote {path}")
    return 0


def kv_costs(model_name: str = "default"):
    """What each KV dtype costs on the model as the CLI runs it (``dtype='auto'``):
    (kvbench's result, its markdown table, a short note per dtype for the picture)."""
    model, tok = load(model_name, dtype="auto", progress=False)
    result = kvbench.measure(model, tok, ("bf16", "int8", "int4"), decode_ppl=False,
                             speed=False)
    ref = result["rows"]["bf16"]
    notes = {}
    for kv, r in result["rows"].items():
        notes[kv] = (f"perplexity {(r['ppl'] / ref['ppl'] - 1) * 100:+.1f} %, "
                     f"greedy agreement {r['agree'] * 100:.0f} %")
    del notes["bf16"]
    notes["fp16"] = "2 bytes a number; measured as bf16: the reference"
    result.update(source=getattr(model, "source", model_name),
                  weights=getattr(model, "mode", "?"))
    return result, kvbench.table(result), notes


def kv_summary(result: dict) -> str:
    """One sentence per quantized KV dtype, from the measured figures."""
    rows, ref = result["rows"], result["rows"]["bf16"]
    parts = []
    for kv in ("int8", "int4"):
        r = rows[kv]
        parts.append(f"{kv} rows take {ref['bytes_per_token'] / r['bytes_per_token']:.2f}× "
                     f"fewer bytes than bf16 ones and change perplexity by "
                     f"{(r['ppl'] / ref['ppl'] - 1) * 100:+.2f} %; their greedy choice is "
                     f"the bf16 cache's at {r['agree'] * 100:.1f} % of positions.")
    return " ".join(parts)


def write_docs(docs: Path, model_name: str = "default") -> Path:
    """Regenerate docs/how-it-decodes.md and every picture in it."""
    img = docs / "img"
    started = time.time()
    cfg_default = load_config(model_name)[0]
    rows = []
    for name in ("smollm2-135m", "llama-2-7b", "llama-2-70b"):
        rows += P.kv_size_rows(name, ModelConfig.preset(name), 4096, 1, KV_SIZE_DTYPES)
    table = P.format_kv_table(rows, 4096, 1)
    kv_quality, kv_lines, kv_notes = kv_costs(model_name)
    P.plot_kv_sizes(rows, img / "kv_size.png", 4096, 1, quality=kv_notes)

    model, tok = load(model_name)
    ids = tok.encode(ATTENTION_TEXT)
    layers = P.record_attention(model, ids)
    labels = P.token_labels(tok, ids)
    P.plot_attention(layers[0], labels, img / "attention_layer0.png",
                     "layer 0, all heads: softmax(QKᵀ/√d_k), causal")
    last = len(layers) - 1
    P.plot_attention(layers[last], labels, img / f"attention_layer{last}_head0.png",
                     f"layer {last}, head 0", head=0)

    _, stats, (ent_s, ent_u) = scaling(img / "scaling.png", model_name)
    _, timing = cache(img / "cache.png", model_name)
    d_k = cfg_default.head_dim

    def stat_rows():
        for s in stats:
            yield (f"| {s['d_k']} | {s['var_dot']:.1f} | {s['entropy_unscaled']:.3f} | "
                   f"{s['entropy_scaled']:.3f} | {s['max_weight_unscaled']:.3f} | "
                   f"{s['max_weight_scaled']:.3f} |")

    def timing_rows():
        for r in timing:
            yield (f"| {r['length']} | {1000 * r['with_cache_s']:.2f} | "
                   f"{1000 * r['without_cache_s']:.2f} | "
                   f"{r['without_cache_s'] / r['with_cache_s']:.1f}× |")

    text = f"""# How kvformer decodes: the seed's ideas, measured

Regenerate this page and its pictures with one command:

```bash
.venv/bin/kvformer explain docs -o docs
```

Model: `{Path(getattr(model, 'source', model_name)).name}` ({cfg_default.n_layer} layers,
{cfg_default.n_head} query heads, {cfg_default.n_kv_head} KV heads, head_dim {d_k}).
Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.
Generated in {{elapsed:.0f}} s.

## 1. Scaled dot-product attention, and why it is scaled

`softmax(QKᵀ/√d_k)·V`. For q and k with independent unit-variance entries, q·k is a sum
of d_k products, so its variance is d_k. Without the scale the softmax sees ever wider
scores as heads grow and collapses toward a one-hot vector: a query attends to one key,
and the gradient through the softmax vanishes. Dividing by √d_k brings the variance back
to 1 and keeps the distribution diffuse. Measured on random vectors (64 keys; a uniform
distribution over 64 keys has entropy {stats[0]['uniform_entropy']:.3f} nats):

| d_k | Var(q·k) | entropy unscaled | entropy scaled | top weight unscaled | top weight scaled |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(stat_rows())}

![scaling](img/scaling.png)

The right panel reads the same off the real model: for every layer and head, the mean
entropy of its attention on a short text, as the model computes it (with 1/√{d_k}) and
as the same scores would give without the scale (exactly recoverable from the weights:
softmax(√d_k · log w)). Mean over all heads: {ent_s.mean():.3f} nats scaled,
{ent_u.mean():.3f} nats unscaled.

## 2. What attention looks at

The weights below come from the model's own attention layers (recorded as they run),
under the causal mask: a token sees itself and the tokens before it, never after.

![layer 0](img/attention_layer0.png)

![last layer, head 0](img/attention_layer{last}_head0.png)

Make your own: `kvformer attention default "some text" --layer 3 -o out.png` (add
`--head H` for one head).

## 3. The KV cache

Decoding is autoregressive: every new token goes back in as input. Its keys and values
depend only on it and the tokens before it, so they are computed once and kept. Without
a cache every step recomputes K and V for the whole sequence; with it, a step runs one
token through the model and attends to the stored ones. Time per generated token on this
machine (median of 3):

| tokens so far | with cache (ms) | without cache (ms) | speed-up |
| --- | --- | --- | --- |
{chr(10).join(timing_rows())}

![cache](img/cache.png)

## 4. What the cache costs, and what MQA and GQA save

Per layer, the cache holds K and V for every KV head: 2 · n_layer · n_kv_head · head_dim ·
tokens · batch · bytes. Multi-query attention (one KV head shared by all query heads)
divides it by n_head; grouped-query attention (G KV heads, each shared by n_head/G query
heads) by n_head/G. The seed's example, G = N/8, is Llama-2-70B's choice: 8× smaller than
its multi-head form.

```
{table}
```

![kv size](img/kv_size.png)

`kvformer kv-size llama-2-70b --context 4096 --batch 8 --plot out.png` prints and draws
this for any preset or model file (`--dtype fp32,fp16,int8,int4` picks the KV dtypes).

### Fewer bytes per number: int8 and int4 keys and values

Fewer KV heads is one way to shrink the cache; fewer bytes per stored number is the other,
and they multiply. `--kv-dtype int8` (`kvformer.load(..., kv_dtype="int8")`) stores each
token's key and value of each KV head as int8 numbers with one bf16 scale (max|x| / 127,
rounded up): 66 bytes for a head_dim-64 row instead of bf16's 128. `--kv-dtype int4`
stores groups of 32 numbers as 4-bit steps between a bf16 minimum and step size: 40 bytes.
Prefill and the native decode step both read the stored rows, dequantized inside the
attention kernel. The legend above and this table give what each costs on
`{Path(kv_quality['source']).name}` ({kv_quality['weights']} weights, as `kvformer
generate` runs it), measured by this command (`kvformer.tools.bench.kv`; `kvformer bench --kv` adds
decode speed and perplexity through the decode step, docs/kv-cache.md):

{chr(10).join(kv_lines)}

{kv_summary(kv_quality)} The default (`--kv-dtype auto`) stays the activations' dtype;
`kvformer serve --kv-dtype int8` fills the same memory with more tokens (docs/serving.md).

## 5. Positions

Attention is order-blind; positions are added to the input (sinusoidal, fixed; or learned)
or rotate q and k (RoPE, SmolLM2's choice), which makes q·k depend only on the distance
between two tokens. `tests/test_positions.py` checks that property; the training
experiments in `docs/experiments.md` compare the three.
"""
    out = docs / "how-it-decodes.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.replace("{elapsed:.0f}", f"{time.time() - started:.0f}"))
    return out
