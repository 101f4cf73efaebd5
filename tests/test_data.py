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
