"""data.py: packing keeps samples apart (positions restart, labels never shift across a boundary)."""

import numpy as np
import torch

from data import TokenizedData, pack_micro_batch


def make_samples(lengths, vocab_size=300, seed=0):
    rng = np.random.default_rng(seed)
    return [(ids, list(ids)) for ids in (rng.integers(3, vocab_size, size=n).tolist() for n in lengths)]


def test_labels_never_shift_across_samples():
    samples = make_samples((4, 3))
    data = TokenizedData(
        input_ids=np.array(samples[0][0] + samples[1][0], np.int32),
        labels=np.array(samples[0][1] + samples[1][1], np.int32),
        offsets=np.array([0, 4, 7]),
        num_loss_tokens=np.array([3, 2]),
    )
    batch = pack_micro_batch(data, [0, 1], torch.device("cpu"))
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch.cu_seqlens.tolist() == [0, 4, 7]
    # Position 3 is sample 0's last token: it must not predict sample 1's first token.
    assert batch.loss_positions.tolist() == [0, 1, 2, 4, 5]
    assert batch.loss_targets.tolist() == samples[0][1][1:] + samples[1][1][1:]


def test_empty_micro_batch_has_no_loss_token():
    data = TokenizedData(np.array([5, 6], np.int32), np.array([5, 6], np.int32), np.array([0, 2]),
                               np.array([1]))
    batch = pack_micro_batch(data, [], torch.device("cpu"))
    assert batch.num_tokens == 1 and batch.loss_positions.numel() == 0


def test_packed_steps_cover_the_batch_and_background_keeps_order():
    import pytest

    from data import in_background, pack_steps
    from distributed import Dist

    lengths = [5, 9, 3, 7, 4, 6]
    data = TokenizedData(np.arange(sum(lengths), dtype=np.int32) % 50, np.arange(sum(lengths), dtype=np.int32) % 50,
                         np.concatenate([[0], np.cumsum(lengths)]), np.array([n - 1 for n in lengths]))
    batches = [(0, 0, [0, 1, 2]), (0, 1, [3, 4, 5])]
    for rank in (0, 1):
        d = Dist(rank, rank, 2, 2, torch.device("cpu"))
        steps = list(in_background(pack_steps(data, iter(batches), 16, d)))
        assert [(s.epoch, s.batch_index, s.sample_ids) for s in steps] == batches
        assert [s.num_tokens for s in steps] == [17, 17] and [s.num_loss_tokens for s in steps] == [14, 14]
        assert all(sum(m.num_tokens for m in s.micro_batches) < 17 for s in steps)  # the other rank has the rest

    def failing():
        yield 1
        raise ValueError("bad line")

    items = in_background(failing())
    assert next(items) == 1
    with pytest.raises(ValueError, match="bad line"):
        next(items)
