"""Train cm-SSFT: ``python train.py --config configs/demo.yaml [key=value ...] [--resume]``."""

from __future__ import annotations

import sys

from cmssft.engine.entry import train_main
from cmssft.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(train_main))
