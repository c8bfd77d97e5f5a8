import sys

from kvformer.cli.main import main

sys.exit(main())
