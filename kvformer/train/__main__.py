"""``python -m kvformer.train ...``: the ``kvformer train`` verb on its own (torchrun runs
this: ``torchrun --nproc_per_node 2 -m kvformer.train --data ... --out ...``)."""

import sys

from kvformer.cli.train import main

sys.exit(main())
