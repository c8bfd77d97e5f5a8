"""Speed, memory and load time of kvformer against transformers: `kvformer bench`.

    python benchmarks/bench.py                   # writes docs/benchmarks.md
    python benchmarks/bench.py --dtype int4 --runs 5 --no-write

See kvformer/bench.py for what is measured and how.
"""

import sys

from kvformer.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
