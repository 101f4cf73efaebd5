"""Which samples each rank trains on: shuffled global batches, split across ranks and token-budget micro-batches.

Every rank computes the same plan from the same inputs (no communication), so it must be deterministic:
numpy's seeded generator for the order, integer arithmetic and index tie-breaks for the packing.
"""

import math
from collections.abc import Iterator, Sequence

import numpy as np


def num_steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch; the last partial batch counts as a step."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return math.ceil(num_samples / batch_size)


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Sample order of one epoch, shuffled from (seed, epoch) with numpy's default_rng, the same on every rank,
    cut into global batches of batch_size; the last partial batch is kept."""
    num_steps = num_steps_per_epoch(num_samples, batch_size)
    # Seeding with (seed, epoch) gives every epoch its own order without depending on earlier epochs.
    order = np.random.default_rng([seed, epoch]).permutation(num_samples).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(num_steps)]


def _pack(
    ids: list[int], lengths: list[int], world_size: int, num_micro: int, cap: int, best_fit: bool
) -> list[list[list[int]]] | None:
    """Places samples longest first on the least-loaded rank that has room, or returns None if one doesn't fit.

    Within that rank the sample goes to the emptiest micro-batch (spreads tokens) or, with best_fit, to the
    fullest one it fits in (packs tighter, for the cases the first strategy can't fit).
    """
    plan: list[list[list[int]]] = [[[] for _ in range(num_micro)] for _ in range(world_size)]
    bin_load = np.zeros((world_size, num_micro), dtype=np.int64)
    rank_load = np.zeros(world_size, dtype=np.int64)
    # Longest first, ties by position: the classic LPT order, and the same on every rank.
    for i in sorted(range(len(ids)), key=lambda i: (-lengths[i], i)):
        length = lengths[i]
        fits = bin_load + length <= cap
        rank_has_room = fits.any(axis=1)
        if not rank_has_room.any():
            return None
        # argmin/argmax return the first minimum, so ties go to the lowest rank / micro-batch index.
        rank = int(np.argmin(np.where(rank_has_room, rank_load, np.iinfo(np.int64).max)))
        if best_fit:
            micro = int(np.argmax(np.where(fits[rank], bin_load[rank], -1)))
        else:
            micro = int(np.argmin(np.where(fits[rank], bin_load[rank], np.iinfo(np.int64).max)))
        plan[rank][micro].append(ids[i])
        bin_load[rank, micro] += length
        rank_load[rank] += length
    return plan


def distribute_batch(
    sample_ids: Sequence[int], lengths: Sequence[int] | np.ndarray, world_size: int, max_tokens_per_gpu: int
) -> list[list[list[int]]]:
    """plan[rank][micro_batch] -> list of sample ids (indices into `lengths`).

    Every micro-batch holds at most max_tokens_per_gpu tokens and every rank gets the same number of micro-batches
    (at least one; some may be empty), so all ranks run the same number of forward/backward passes per step.
    That number starts at the lower bound ceil(total_tokens / (world_size * max_tokens_per_gpu)) and grows until
    the greedy packing fits. Ranks are balanced by LPT, so the busiest rank is close to the mean load.
    Raises ValueError if any sample is longer than max_tokens_per_gpu.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if max_tokens_per_gpu < 1:
        raise ValueError(f"max_tokens_per_gpu must be >= 1, got {max_tokens_per_gpu}")
    ids = [int(i) for i in sample_ids]
    sample_lengths = [int(lengths[i]) for i in ids]
    for sample_id, length in zip(ids, sample_lengths, strict=True):
        if length > max_tokens_per_gpu:
            raise ValueError(
                f"sample {sample_id} has {length} tokens, more than max_tokens_per_gpu={max_tokens_per_gpu}"
            )
    total = sum(sample_lengths)
    lower_bound = max(1, math.ceil(total / (world_size * max_tokens_per_gpu)))
    # With as many micro-batches as samples there is always an empty one left, so the last try always fits.
    for num_micro in range(lower_bound, max(lower_bound, len(ids)) + 1):
        for best_fit in (False, True):
            plan = _pack(ids, sample_lengths, world_size, num_micro, max_tokens_per_gpu, best_fit)
            if plan is not None:
                return plan
    raise AssertionError("unreachable: one micro-batch per sample always fits")


def batches_from(
    num_samples: int, batch_size: int, seed: int, num_epochs: int, epoch: int, batch_index: int
) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, batch index, batch) from the data position (epoch, batch_index) to the end of the last epoch.

    A resumed run starts where the saved one stopped; an index past an epoch's last batch means the next epoch.
    """
    for e in range(epoch, num_epochs):
        batches = epoch_batches(num_samples, batch_size, seed, e)
        for i in range(batch_index if e == epoch else 0, len(batches)):
            yield e, i, batches[i]
