"""Search your own images: ``python search.py --checkpoint best.pth --query q/ --gallery g/ --out results/``.

See docs/USAGE.md; the logic lives in :mod:`cmssft.search`.
"""

from __future__ import annotations

import sys

from cmssft.errors import run_cli
from cmssft.search import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
