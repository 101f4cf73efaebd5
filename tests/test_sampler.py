import math

import numpy as np
import pytest

from sampler import distribute_batch, epoch_batches, num_steps_per_epoch


def lognormal_lengths(rng: np.random.Generator, n: int, max_tokens: int) -> np.ndarray:
    """Chat-like lengths: many short samples, a long tail, clipped to the budget."""
    return np.clip(rng.lognormal(mean=6.0, sigma=1.0, size=n).astype(int) + 1, 1, max_tokens)


def check_plan(plan, sample_ids, lengths, world_size, max_tokens):
    """The invariants every plan must hold: a partition of the batch, within budget, equal micro-batch counts."""
    assert len(plan) == world_size
    assert len({len(rank) for rank in plan}) == 1
    assert len(plan[0]) >= 1
    placed = [i for rank in plan for micro in rank for i in micro]
    assert sorted(placed) == sorted(sample_ids)
    for rank in plan:
        for micro in rank:
            assert sum(int(lengths[i]) for i in micro) <= max_tokens


def rank_loads(plan, lengths) -> list[int]:
    return [sum(int(lengths[i]) for micro in rank for i in micro) for rank in plan]


def round_robin_loads(sample_ids, lengths, world_size) -> list[int]:
    """The naive split: sample k of the batch to rank k % world_size."""
    loads = [0] * world_size
    for k, i in enumerate(sample_ids):
        loads[k % world_size] += int(lengths[i])
    return loads


def test_invariants_on_random_batches():
    rng = np.random.default_rng(0)
    for _ in range(200):
        max_tokens = int(rng.integers(64, 4096))
        lengths = lognormal_lengths(rng, int(rng.integers(1, 400)), max_tokens)
        sample_ids = rng.choice(len(lengths), size=int(rng.integers(0, len(lengths) + 1)), replace=False).tolist()
        world_size = int(rng.integers(1, 9))
        plan = distribute_batch(sample_ids, lengths, world_size, max_tokens)
        check_plan(plan, sample_ids, lengths, world_size, max_tokens)
        lower_bound = max(1, math.ceil(int(lengths[sample_ids].sum()) / (world_size * max_tokens)))
        assert len(plan[0]) >= lower_bound


@pytest.mark.parametrize(
    ("lengths", "world_size", "max_tokens", "expected_micro"),
    [
        ([10] * 8, 2, 40, 1),  # four per rank fill one micro-batch exactly
        ([10] * 8, 2, 20, 2),
        ([6, 4, 6, 4, 6, 4, 6, 4], 2, 10, 2),  # pairs must be matched 6+4
        ([7, 3, 5, 5], 1, 10, 2),
        ([5, 5, 4, 3, 3], 1, 10, 2),  # spreading evenly fails here; tight packing (5+5, 4+3+3) fits
        ([1], 4, 100, 1),
    ],
)
def test_minimal_micro_batches_on_exact_fits(lengths, world_size, max_tokens, expected_micro):
    sample_ids = list(range(len(lengths)))
    plan = distribute_batch(sample_ids, lengths, world_size, max_tokens)
    check_plan(plan, sample_ids, lengths, world_size, max_tokens)
    assert len(plan[0]) == expected_micro


def test_balance_beats_round_robin():
    rng = np.random.default_rng(1)
    world_size, max_tokens = 8, 8192
    lpt_excess = rr_excess = 0.0
    for _ in range(50):
        lengths = lognormal_lengths(rng, 256, max_tokens)
        sample_ids = list(range(len(lengths)))
        plan = distribute_batch(sample_ids, lengths, world_size, max_tokens)
        loads = rank_loads(plan, lengths)
        mean = sum(loads) / world_size
        assert max(loads) <= mean + int(lengths.max())
        lpt_excess += max(loads) - mean
        rr_excess += max(round_robin_loads(sample_ids, lengths, world_size)) - mean
    # LPT keeps the busiest rank far closer to the mean than the naive split.
    assert lpt_excess < 0.2 * rr_excess


def test_deterministic_and_independent_of_other_lengths():
    rng = np.random.default_rng(2)
    lengths = lognormal_lengths(rng, 500, 2048)
    sample_ids = rng.permutation(500)[:128].tolist()
    plan = distribute_batch(sample_ids, lengths, 4, 2048)
    assert distribute_batch(sample_ids, lengths.tolist(), 4, 2048) == plan
    assert distribute_batch(np.array(sample_ids), lengths.copy(), 4, 2048) == plan


def test_ties_are_broken_by_index():
    # All lengths equal: samples are placed in batch order onto the lowest-index least-loaded rank.
    plan = distribute_batch([3, 1, 2, 0], [5, 5, 5, 5], 2, 10)
    assert plan == [[[3, 2]], [[1, 0]]]


def test_more_ranks_than_samples_gives_empty_micro_batches():
    lengths = [100, 200, 300]
    plan = distribute_batch([0, 1, 2], lengths, 8, 1000)
    check_plan(plan, [0, 1, 2], lengths, 8, 1000)
    assert [len(rank) for rank in plan] == [1] * 8
    assert sum(1 for rank in plan if rank[0]) == 3
    assert distribute_batch([], lengths, 4, 1000) == [[[]]] * 4


def test_oversize_sample_raises():
    with pytest.raises(ValueError, match="sample 1 has 101 tokens"):
        distribute_batch([0, 1], [50, 101], 2, 100)
    distribute_batch([0, 1], [50, 100], 2, 100)  # exactly the budget is fine


def test_epoch_batches():
    num_samples, batch_size = 103, 10
    batches = epoch_batches(num_samples, batch_size, seed=7, epoch=0)
    assert len(batches) == num_steps_per_epoch(num_samples, batch_size) == 11
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(i for b in batches for i in b) == list(range(num_samples))
    assert all(isinstance(i, int) for b in batches for i in b)
    assert epoch_batches(num_samples, batch_size, seed=7, epoch=0) == batches
    assert epoch_batches(num_samples, batch_size, seed=7, epoch=1) != batches
    assert epoch_batches(num_samples, batch_size, seed=8, epoch=0) != batches
    assert sorted(i for b in epoch_batches(num_samples, batch_size, 7, 1) for i in b) == list(range(num_samples))
    assert epoch_batches(20, 10, seed=0, epoch=0)[-1] != []  # an exact multiple adds no empty batch
    assert len(epoch_batches(20, 10, seed=0, epoch=0)) == 2


def test_batches_from_a_data_position_continue_the_same_order():
    from sampler import batches_from

    everything = list(batches_from(10, 4, seed=1, num_epochs=3, epoch=0, batch_index=0))
    assert [(e, i) for e, i, _ in everything] == [(e, i) for e in range(3) for i in range(3)]
    assert [b for _, _, b in everything[:3]] == epoch_batches(10, 4, 1, 0)
    assert list(batches_from(10, 4, 1, 3, epoch=1, batch_index=2)) == everything[5:]
    # Past the last batch of an epoch (a state saved at an epoch's end) means the start of the next one.
    assert list(batches_from(10, 4, 1, 3, epoch=0, batch_index=3)) == everything[3:]
    assert list(batches_from(10, 4, 1, 3, epoch=2, batch_index=3)) == []
