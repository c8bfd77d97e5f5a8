"""``kvformer models``: the models kvformer can find, and where it looks."""

from __future__ import annotations

import os
import sys

from kvformer.formats.catalog import format_table, list_models
from kvformer.formats.load import MODELS_ENV, model_dirs


def run(args) -> int:
    print(format_table(list_models()))
    dirs = model_dirs()
    where = ", ".join(str(d) for d in dirs) or "(none)"
    source = f"${MODELS_ENV}" if os.environ.get(MODELS_ENV) is not None else \
        f"the default; set ${MODELS_ENV} to look elsewhere"
    print(f"\nmodels are looked for in {where} ({source})", file=sys.stderr)
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        print(f"{', '.join(missing)}: no such directory; put .gguf files or model directories "
              "there to use them by name (--model NAME)", file=sys.stderr)
    return 0
