"""Evaluate a checkpoint or a features file: ``python eval.py --config CFG --features F.npz``.

See docs/EVALUATION.md; the logic lives in :mod:`cmssft.evaluation.cli`.
"""

from __future__ import annotations

import sys

from cmssft.errors import run_cli
from cmssft.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
