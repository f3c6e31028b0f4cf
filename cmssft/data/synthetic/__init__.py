"""The built-in synthetic cross-modality (RGB / IR) person dataset.

Persons are drawn from per-identity trait vectors (shared shape and layout,
RGB-only colours, IR-only emissions) with per-camera and per-image nuisance,
and written in the exact SYSU-MM01, RegDB or LLCM layout so the real loaders read
them unchanged. See docs/SYNTHETIC.md.
"""

from cmssft.data.synthetic.generate import (
    GenerationReport,
    ensure_synthetic,
    generate_dataset,
    plan_dataset,
    plan_metadata,
)
from cmssft.data.synthetic.layouts import PlannedFile
from cmssft.data.synthetic.traits import DifficultyParams, difficulty_params

__all__ = [
    "DifficultyParams",
    "GenerationReport",
    "PlannedFile",
    "difficulty_params",
    "ensure_synthetic",
    "generate_dataset",
    "plan_dataset",
    "plan_metadata",
]
