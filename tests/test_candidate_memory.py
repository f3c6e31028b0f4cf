"""The SSTN's candidate memory: earlier batches join the training graph as columns only."""

from __future__ import annotations

import json

import pytest
import torch

from cmssft.engine.entry import train_main
from cmssft.models.candidate_memory import CandidateMemory
from cmssft.models.sstn import SSTN
from cmssft.utils.host_reads import count_host_reads

from .conftest import TINY_DATA
from .test_sstn import DIM, make_bank


def batch(n: int, seed: int, first_label: int = 0):
    shared, specific, modality = make_bank(n, seed)
    return shared, specific, modality, torch.arange(first_label, first_label + n)


def twin_sstns(memory: int, **kwargs) -> tuple[SSTN, SSTN]:
    """Two SSTNs with the same weights, one with a memory of ``memory`` samples, in training mode."""
    torch.manual_seed(0)
    plain = SSTN(DIM, topk=3, temperature=0.3, **kwargs)
    torch.manual_seed(0)
    remembering = SSTN(DIM, topk=3, temperature=0.3, memory=memory, **kwargs)
    remembering.load_state_dict(plain.state_dict(), strict=False)
    return plain.train(), remembering.train()


def test_memory_is_a_fifo_ring():
    memory = CandidateMemory(5, DIM, use_specific=True)
    assert memory.entries()[0].shape == (0, DIM)
    first = batch(3, seed=0)
    memory.push(*first)
    shared, specific, modality, labels = memory.entries()
    assert torch.equal(shared, first[0]) and torch.equal(specific, first[1])
    assert labels.tolist() == [0, 1, 2] and torch.equal(modality, first[2])
    memory.push(*batch(4, seed=1, first_label=10))  # wraps: slots 3, 4, 0, 1
    assert int(memory.filled) == 5 and int(memory.cursor) == 2
    assert memory.labels.tolist() == [12, 13, 2, 10, 11]
    memory.push(*batch(7, seed=2, first_label=20))  # larger than the memory: its last 5 samples
    assert sorted(memory.labels.tolist()) == [22, 23, 24, 25, 26]
    assert memory.labels[2].item() == 22  # written from the cursor on


def test_first_batch_sees_no_memory_and_fills_it():
    plain, remembering = twin_sstns(memory=16)
    shared, specific, modality, labels = batch(8, seed=3)
    expected = plain(shared, specific, modality, labels)
    out = remembering(shared, specific, modality, labels)
    assert torch.allclose(out.fused, expected.fused) and torch.equal(out.graph.index, expected.graph.index)
    assert int(remembering.memory.filled) == 8
    assert torch.equal(remembering.memory.entries()[3], labels)


@pytest.mark.parametrize("kwargs", [{}, {"cross_k": 2}, {"cross_k": 3, "center": True}, {"use_specific": False}])
def test_batch_rows_are_those_of_a_graph_over_batch_and_memory(kwargs):
    """Rows of the batch see the remembered samples as further nodes; the remembered rows receive nothing."""
    plain, remembering = twin_sstns(memory=16, **kwargs)
    earlier = batch(8, seed=4, first_label=100)
    remembering(*earlier)
    now = batch(6, seed=5)
    out = remembering(*now)
    assert out.graph.index.shape == (6, 3)
    assert bool((out.graph.index >= 6).any()), "no remembered sample was kept as a neighbour"
    assert out.column_labels.tolist() == [*range(6), *range(100, 108)]
    both = [torch.cat([a, b]) if a is not None else None for a, b in zip(now, earlier, strict=True)]
    if not plain.use_specific:
        both[1] = None
    reference = plain(*both)
    assert torch.allclose(out.fused, reference.fused[:6], atol=1e-6)
    assert torch.equal(out.graph.index, reference.graph.index[:6])


def test_a_training_forward_with_memory_reads_nothing_back():
    _, remembering = twin_sstns(memory=16)
    remembering(*batch(8, seed=13, first_label=50))
    with count_host_reads() as reads:
        remembering(*batch(6, seed=14))
    assert sum(reads.values()) == 0, reads


def test_no_gradient_reaches_the_memory_and_the_batch_gets_one():
    _, remembering = twin_sstns(memory=16)
    remembering(*batch(8, seed=6, first_label=50))
    shared, specific, modality, labels = batch(6, seed=7)
    shared.requires_grad_(True)
    out = remembering(shared, specific, modality, labels)
    out.fused.square().sum().backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    assert not remembering.memory.shared.requires_grad


def test_test_time_ignores_the_memory():
    plain, remembering = twin_sstns(memory=16)
    for sstn in (plain, remembering):  # the same BN-neck statistics
        sstn(*batch(8, seed=8, first_label=50))
        sstn.eval()
    query, gallery = batch(5, seed=9)[:3], batch(7, seed=10)[:3]
    for mode in ("transductive", "single_query"):
        assert torch.equal(remembering.distance(query, gallery, mode), plain.distance(query, gallery, mode))
    filled = int(remembering.memory.filled)
    remembering(*batch(4, seed=11))  # an eval-mode forward neither reads nor writes it
    assert int(remembering.memory.filled) == filled


def test_the_memory_travels_in_the_state_dict():
    _, remembering = twin_sstns(memory=16)
    remembering(*batch(8, seed=12, first_label=70))
    _, restored = twin_sstns(memory=16)
    restored.load_state_dict(remembering.state_dict())
    for mine, theirs in zip(restored.memory.entries(), remembering.memory.entries(), strict=True):
        assert torch.equal(mine, theirs)
    assert int(restored.memory.cursor) == int(remembering.memory.cursor)


def test_training_graphs_with_memory_offer_fewer_same_identity_candidates(tmp_path, sysu_root):
    """A short run with ``model.sstn.memory``: the memory fills and the kept training edges reach the
    right identity less often than without it, as in a test graph."""
    shares = {}
    for memory in (0, 64):
        run = tmp_path / f"m{memory}"
        args = ["--run-dir", str(run), f"data.root={sysu_root}", *TINY_DATA, "model.specific_from=layer4",
                "train.epochs=1", "train.iters_per_epoch=6", "train.log_every=1", "train.eval_every=0",
                "train.deterministic=true", "eval.trials=1", "eval.compare_modes=[]", "eval.flip=false",
                "seed=0", f"model.sstn.memory={memory}"]
        assert train_main(args) == 0
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "model/sstn/cross_same_id_edges" in r]
        shares[memory] = sum(r["model/sstn/cross_same_id_edges"] for r in steps[2:]) / len(steps[2:])
    assert shares[64] < shares[0] - 0.05, shares


def test_weights_saved_without_a_memory_load_into_a_model_with_one():
    """Checkpoints written before the memory existed (or with memory 0) still evaluate and resume."""
    from cmssft.engine.checkpoint import load_model_state
    from cmssft.errors import UserError

    plain, remembering = twin_sstns(memory=16)
    remembering(*batch(8, seed=15))
    load_model_state(remembering, plain.state_dict(), "old.pth")
    assert int(remembering.memory.filled) == 0 and remembering.memory.entries()[0].shape[0] == 0
    broken = {k: v for k, v in plain.state_dict().items() if not k.startswith("neck.bn.running_mean")}
    with pytest.raises(UserError, match="missing: neck.bn.running_mean"):
        load_model_state(remembering, broken, "old.pth")
