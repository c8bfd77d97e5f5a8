"""``kvformer kv-size``: KV-cache bytes of models as MHA, GQA and MQA."""

from __future__ import annotations

from kvformer.formats.load import load_config
from kvformer.tools.pictures import DTYPE_NAMES, format_kv_table, kv_size_rows, plot_kv_sizes


def run(args) -> int:
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes or [""]:
        if d not in DTYPE_NAMES:
            raise ValueError(f"--dtype {d!r} is not one of {', '.join(DTYPE_NAMES)}")
    if args.context < 1 or args.batch < 1:
        raise ValueError("--context and --batch must be >= 1")
    rows = []
    for name in args.models:
        cfg = load_config(name)[0]
        rows += kv_size_rows(name, cfg, args.context, args.batch, dtypes)
    print(format_kv_table(rows, args.context, args.batch))
    if args.plot:
        print(f"wrote {plot_kv_sizes(rows, args.plot, args.context, args.batch)}")
    return 0
