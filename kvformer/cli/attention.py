"""``kvformer attention``: heatmaps of a model's attention weights."""

from __future__ import annotations

from kvformer.cli.common import load_model, model_arg
from kvformer.errors import KvformerError
from kvformer.tools.pictures import plot_attention, record_attention, token_labels


def run(args) -> int:
    name = model_arg(args)
    model, tok = load_model(args, name, dtype="fp32")
    if tok is None:
        raise KvformerError(f"{name}: no tokenizer found beside the model")
    ids = tok.encode(args.text)
    model.check_context(len(ids))
    cfg = model.cfg
    if not 0 <= args.layer < cfg.n_layer:
        raise ValueError(f"--layer {args.layer} is out of range: the model has layers "
                         f"0..{cfg.n_layer - 1}")
    if args.head is not None and not 0 <= args.head < cfg.n_head:
        raise ValueError(f"--head {args.head} is out of range: the model has heads "
                         f"0..{cfg.n_head - 1}")
    weights = record_attention(model, ids)[args.layer]
    what = f"head {args.head}" if args.head is not None else f"all {cfg.n_head} heads"
    out = plot_attention(weights, token_labels(tok, ids), args.output,
                         f"layer {args.layer}, {what}: softmax(QKᵀ/√d_k), causal", args.head)
    print(f"wrote {out}")
    return 0
