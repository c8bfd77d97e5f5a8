"""What one int8 level of activations costs in quality: perplexity of a model on bench's
fixed English text with x entering the int4 kernels as two int8 levels (``int16``, the
default) and as one (``int8``, ``--activations int8``), both in one process, two ways:

    decode   the text fed one token at a time through the C++ decode step (what generation
             and the server run);
    prefill  the whole text in one forward, every matmul on the int4 kernels (the dense
             bf16 matmul that prefill uses for 64+ rows is turned off, so the mode counts).

Speed is in ``benchmarks/decode_batch.py --activations int16 int8``.

    python benchmarks/activations.py                  # SmolLM2-135M, int4 (its GGUF grid)
"""

from __future__ import annotations

import argparse

# isort: off
import kvformer  # noqa: F401  (before torch, as the CLI does: see kvformer/__init__.py)
import torch
# isort: on

from kvformer.formats.load import load
from kvformer.runtime import native
from kvformer.runtime import quant as quantize
from kvformer.runtime.generation import perplexity
from kvformer.tools.bench.run import TEXT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    if not native.available():
        raise SystemExit("the native kernels are not built: activation levels are theirs")
    model, tok = load(args.model, dtype=args.dtype, progress=False)
    ids = tok.encode(TEXT)
    rows = {}
    for mode in ("int16", "int8"):
        native.activations(mode)
        dense, quantize.DENSE_ROWS = quantize.DENSE_ROWS, 1 << 30
        try:
            pre = perplexity(model, ids)
        finally:
            quantize.DENSE_ROWS = dense
        rows[mode] = (perplexity(model, ids, token_by_token=True), pre)
    print(f"{args.model} ({args.dtype}, {native.kernel_path()}), {len(ids)} tokens, "
          f"{torch.get_num_threads()} threads\n")
    print("| activations into int4 | perplexity, decode | vs int16 | perplexity, prefill on "
          "the kernels | vs int16 |")
    print("|---|---:|---:|---:|---:|")
    for mode, (dec, pre) in rows.items():
        print(f"| {mode} | {dec:.3f} | {(dec / rows['int16'][0] - 1) * 100:+.2f} % | "
              f"{pre:.3f} | {(pre / rows['int16'][1] - 1) * 100:+.2f} % |")


if __name__ == "__main__":
    main()
