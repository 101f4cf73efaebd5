"""data.py: packing keeps samples apart (positions restart, labels never shift across a boundary); validation names
the line and the value; concurrent writers of one cache all succeed."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from data import TokenizedData, pack_micro_batch, read_tokenized_jsonl, save_cache
from utils import InputError


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


# ----------------------------------------------------------------------------------------------------------------------
# Validation and the cache


@pytest.mark.parametrize(("line", "message"), [
    ('{"input_ids": [1.7, 2, 3], "labels": [1, 2, 3]}', "input_ids[0] is 1.7, a number with a fraction or an exponent"),
    ('{"input_ids": [1, 2, 3], "labels": [-100, "3", 3]}', 'labels[1] is "3", a string'),
    ('{"input_ids": [1, true, 3], "labels": [1, 2, 3]}', "input_ids[1] is true, a boolean"),
    ('{"input_ids": [1, 2, 3.0], "labels": [1, 2, 3]}', "input_ids[2] is 3.0, a number with a fraction or an exponent"),
    ('{"input_ids": [1, 2, 3], "labels": [1, 2, null]}', "labels[2] is null, null"),
])
def test_what_is_not_an_integer_stops_the_run_at_its_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"input_ids": [1, 2], "labels": [1, 2]}\n' + line + "\n")
    expected = f"{path}:2: 'input_ids' and 'labels' must hold integers: {message}"
    with pytest.raises(InputError, match=re.escape(expected)):
        read_tokenized_jsonl(str(path), max_tokens_per_gpu=64, vocab_size=320)


@pytest.mark.parametrize(("line", "message"), [
    ('{"input_ids": [1, 2, 151643], "labels": [1, 2, 3]}',
     "token id out of the model's vocabulary: input_ids[2] = 151643, vocabulary size 320 (tokenized with another "
     "tokenizer?)"),
    ('{"input_ids": [1, 2, 3], "labels": [-100, 400, 3]}',
     "label out of the model's vocabulary and not -100: labels[1] = 400, vocabulary size 320 (tokenized with another "
     "tokenizer?)"),
    ('{"input_ids": [1, 2, 3], "labels": [-100, 99999999999999999999, 3]}', "beyond 64 bits"),
])
def test_a_vocabulary_mismatch_names_the_id_the_size_and_the_likely_cause(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=re.escape(f"{path}:1: ") + ".*" + re.escape(message)):
        read_tokenized_jsonl(str(path), max_tokens_per_gpu=64, vocab_size=320)


def test_a_cache_in_place_is_kept_when_another_node_writes_the_same_one(tmp_path):
    """The second writer of a cache (another node on a shared filesystem) finds it in place and uses it."""
    cache_dir = tmp_path / ".data_cache" / "key"
    arrays = {"input_ids": np.arange(5)}
    save_cache(cache_dir, arrays, {"writer": 1})
    save_cache(cache_dir, arrays, {"writer": 2})
    assert json.loads((cache_dir / "meta.json").read_text()) == {"writer": 1}
    assert sorted(p.name for p in cache_dir.parent.iterdir()) == ["key"]  # no temporary folder left


def test_many_writers_of_one_cache_at_once_all_succeed(tmp_path):
    cache_dir = tmp_path / ".data_cache" / "key"
    arrays = {"input_ids": np.arange(100_000), "labels": np.arange(100_000)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda writer: save_cache(cache_dir, arrays, {"writer": writer}), range(16)))
    assert np.array_equal(np.load(cache_dir / "labels.npy"), arrays["labels"])
    assert sorted(p.name for p in cache_dir.parent.iterdir()) == ["key"]
