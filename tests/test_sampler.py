import pytest

from cmssft.data.records import Modality, Sample
from cmssft.data.sampler import CrossModalityIdentitySampler, KeyedBatchSampler, default_num_batches
from cmssft.errors import DatasetError


def make_samples(num_ids=6, rgb=5, ir=2):
    samples = []
    for label in range(num_ids):
        samples += [Sample(f"r{label}_{i}", label + 100, 1, Modality.RGB, label) for i in range(rgb)]
        samples += [Sample(f"i{label}_{i}", label + 100, 3, Modality.IR, label) for i in range(ir)]
    return samples


def test_every_batch_is_p_by_k_per_modality_without_repeated_ids():
    samples = make_samples()
    p, k = 4, 3
    sampler = CrossModalityIdentitySampler(samples, p, k, num_batches=20, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        assert len(batch) == 2 * p * k
        rgb, ir = batch[: p * k], batch[p * k :]
        assert all(samples[i].modality == Modality.RGB for i in rgb)
        assert all(samples[i].modality == Modality.IR for i in ir)
        rgb_labels = [samples[i].label for i in rgb]
        ir_labels = [samples[i].label for i in ir]
        assert rgb_labels == ir_labels  # the same identities, in the same slots
        assert len(set(rgb_labels)) == p  # no identity repeated across groups
        assert all(rgb_labels.count(label) == k for label in set(rgb_labels))


def test_images_without_replacement_when_enough():
    samples = make_samples(rgb=5)
    sampler = CrossModalityIdentitySampler(samples, 2, 4, num_batches=10, seed=0)
    for batch in sampler:
        rgb = batch[:8]
        assert len(set(rgb)) == 8


def test_seeded_and_epoch_dependent():
    samples = make_samples()
    a = CrossModalityIdentitySampler(samples, 3, 2, num_batches=5, seed=7)
    b = CrossModalityIdentitySampler(samples, 3, 2, num_batches=5, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    c = CrossModalityIdentitySampler(samples, 3, 2, num_batches=5, seed=8)
    assert list(c) != first


def test_shards_partition_the_global_sequence():
    samples = make_samples()
    full = list(CrossModalityIdentitySampler(samples, 3, 2, num_batches=7, seed=3))
    shards = [
        list(CrossModalityIdentitySampler(samples, 3, 2, 7, seed=3, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert shards[0] == full[0::2] and shards[1] == full[1::2]


def test_identities_missing_a_modality_are_skipped():
    samples = make_samples(num_ids=3) + [Sample("only_rgb", 999, 1, Modality.RGB, 3)]
    sampler = CrossModalityIdentitySampler(samples, 3, 1, num_batches=5)
    assert 3 not in {samples[i].label for batch in sampler for i in batch}
    with pytest.raises(DatasetError, match="only 3 identities"):
        CrossModalityIdentitySampler(samples, 4, 1, num_batches=5)


def test_default_epoch_is_one_pass_over_rgb():
    assert default_num_batches(make_samples(num_ids=6, rgb=5), 2, 3) == 30 // 6


def test_keyed_batches_match_plain_batches_and_fix_seeds():
    samples = make_samples()
    sampler = CrossModalityIdentitySampler(samples, 3, 2, num_batches=4, seed=2)
    keyed = list(KeyedBatchSampler(sampler))
    assert [[i for i, _ in batch] for batch in keyed] == list(sampler)
    seeds = [s for batch in keyed for _, s in batch]
    assert len(set(seeds)) == len(seeds)
    shard = CrossModalityIdentitySampler(samples, 3, 2, num_batches=4, seed=2, rank=1, world_size=2)
    assert list(shard.keyed_batches()) == keyed[1::2]
