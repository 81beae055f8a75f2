"""``python -m depthkv ...``: the same command line as ``depthkv`` (for machines without the console script)."""

import sys

from depthkv.cli import main

sys.exit(main())
