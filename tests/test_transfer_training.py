"""Training the transfer: the cross-modality fused triplet must not collapse the features.

With the fused triplet on raw fused features (``loss.normalize_fused=false``) and one top-k over
each row (``model.sstn.cross_k=0``), ``loss.fused_triplet=cross`` compares an RGB sample's own
specific slot with an IR sample's nearly empty one: distances are set by slot norms, not identity,
the term is ~10x every other, and within a few dozen steps the shared features separate the
modalities completely (the modality discriminator's loss reaches ~0 despite gradient reversal)
while the identity loss stalls. Unit-vector distances and other-modality neighbours (the defaults)
train normally. Both runs below are seeded and deterministic.
"""

from __future__ import annotations

import json

import pytest

from cmssft.engine.entry import train_main

from .conftest import TINY_DATA

STEPS = 40


def last_losses(run_dir, count: int = 5) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss/total" in r][-count:]
    return {key: sum(r[key] for r in losses) / len(losses) for key in ("loss/modality", "loss/id_shared")}


@pytest.mark.parametrize(
    ("extra", "collapses"),
    [
        ([], False),  # defaults: normalised fused triplet, other-modality neighbours
        # the raw form, as before the fix (and before the candidate memory): the control
        (["loss.normalize_fused=false", "model.sstn.cross_k=0", "model.sstn.memory=0"], True),
    ],
)
def test_cross_modality_fused_triplet_trains_without_collapse(tmp_path, sysu_root, extra, collapses):
    args = ["--run-dir", str(tmp_path / "run"), f"data.root={sysu_root}", *TINY_DATA,
            "data.ids_per_batch=4", "model.specific_from=layer4", "loss.fused_triplet=cross",
            "train.epochs=1", f"train.iters_per_epoch={STEPS}", "train.optimizer=adam", "train.lr=1e-3",
            "train.warmup_epochs=0", "train.deterministic=true", "train.log_every=1", "train.eval_every=0",
            "eval.trials=1", "eval.compare_modes=[]", "eval.flip=false", "seed=0", *extra]
    assert train_main(args) == 0
    end = last_losses(tmp_path / "run")
    if collapses:
        assert end["loss/modality"] < 0.01, end  # the shared features give the modality away
    else:
        assert end["loss/modality"] > 0.03, end
