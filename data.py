"""Tokenized data to micro-batches: process_data.py's JSONL is validated once, cached as flat arrays that every rank
memory-maps, and packed into padding-free rows whose samples never see each other."""

import dataclasses
import errno
import functools
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

import numpy as np
import torch

from distributed import Dist, fail_distributed, first_error
from sampler import distribute_batch
from utils import InputError, iter_jsonl_lines, parse_json_line, print0, temporary_path


@dataclass
class TokenizedData:
    input_ids: np.ndarray  # all samples concatenated (int32)
    labels: np.ndarray  # same layout; -100 where no loss
    offsets: np.ndarray  # sample i is [offsets[i], offsets[i+1])
    num_loss_tokens: np.ndarray  # per sample: labels that are predicted, i.e. labels[1:] != -100
    fingerprint: str = ""  # sha1 of the arrays: a resumed run checks it trains on the same samples

    @functools.cached_property
    def lengths(self) -> np.ndarray:  # computed once: every step reads it
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


JSON_KINDS = {bool: "a boolean", float: "a number with a fraction or an exponent", str: "a string",
              type(None): "null", list: "an array", dict: "an object"}


def not_integers(name: str, values: list) -> str | None:
    """What is not a JSON integer in `values`, first one named, or None. Booleans and numbers such as 2.0 or 1e3 are
    refused: numpy would turn them into token ids without a word."""
    if set(map(type, values)) <= {int}:  # one pass in C: the common case costs little
        return None
    index, value = next((i, v) for i, v in enumerate(values) if type(v) is not int)
    return f"{name}[{index}] is {json.dumps(value)}, {JSON_KINDS[type(value)]}"


def read_tokenized_jsonl(path: str, max_tokens_per_gpu: int, vocab_size: int) -> tuple[dict, dict]:
    """Validates every line and returns the flat arrays plus counts of dropped samples by reason."""
    ids_chunks, label_chunks, lengths, loss_counts = [], [], [], []
    dropped = {"longer than --max-tokens-per-gpu": 0, "no trainable token": 0}
    for line_number, line in iter_jsonl_lines(path):
        record = parse_json_line(path, line_number, line)
        if "input_ids" not in record or "labels" not in record:
            hint = " (it looks like chat data: run process_data.py first)" if "messages" in record else ""
            raise InputError(path, line_number, f"missing 'input_ids' or 'labels'{hint}")
        input_ids, labels = record["input_ids"], record["labels"]
        if not isinstance(input_ids, list) or not isinstance(labels, list) or len(input_ids) != len(labels):
            raise InputError(path, line_number, "'input_ids' and 'labels' must be lists of the same length")
        if not input_ids:
            raise InputError(path, line_number, "empty 'input_ids'")
        for name, values in (("input_ids", input_ids), ("labels", labels)):
            problem = not_integers(name, values)
            if problem:
                raise InputError(path, line_number, f"'input_ids' and 'labels' must hold integers: {problem}")
        try:
            ids_array = np.asarray(input_ids, dtype=np.int64)
            labels_array = np.asarray(labels, dtype=np.int64)
        except OverflowError:
            raise InputError(path, line_number, "token id or label out of the model's vocabulary: beyond 64 bits "
                             "(tokenized with another tokenizer?)") from None
        bad_ids = np.flatnonzero((ids_array < 0) | (ids_array >= vocab_size))
        if bad_ids.size:
            raise InputError(path, line_number, f"token id out of the model's vocabulary: input_ids[{bad_ids[0]}] = "
                             f"{ids_array[bad_ids[0]]}, vocabulary size {vocab_size} (tokenized with another "
                             "tokenizer?)")
        bad_labels = np.flatnonzero((labels_array != -100) & ((labels_array < 0) | (labels_array >= vocab_size)))
        if bad_labels.size:
            raise InputError(path, line_number, f"label out of the model's vocabulary and not -100: labels["
                             f"{bad_labels[0]}] = {labels_array[bad_labels[0]]}, vocabulary size {vocab_size} "
                             "(tokenized with another tokenizer?)")
        if len(ids_array) > max_tokens_per_gpu:
            dropped["longer than --max-tokens-per-gpu"] += 1
            continue
        num_loss_tokens = int((labels_array[1:] != -100).sum())
        if num_loss_tokens == 0:
            dropped["no trainable token"] += 1
            continue
        ids_chunks.append(ids_array.astype(np.int32))
        label_chunks.append(labels_array.astype(np.int32))
        lengths.append(len(ids_array))
        loss_counts.append(num_loss_tokens)
    arrays = {
        "input_ids": np.concatenate(ids_chunks) if ids_chunks else np.zeros(0, np.int32),
        "labels": np.concatenate(label_chunks) if label_chunks else np.zeros(0, np.int32),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "num_loss_tokens": np.asarray(loss_counts, dtype=np.int64),
    }
    return arrays, dropped


def save_cache(cache_dir: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Writes the cache into a temporary folder beside `cache_dir` and renames it into place, meta.json last inside;
    a failure (a full disk) names the cache and leaves nothing behind.

    On a shared filesystem the first process of every node may write the same cache at once: the first rename wins,
    and a later one finds a complete folder in its way (the rename fails: the target is not empty), drops its own
    copy and uses that one, which holds the same arrays (same key). A cache in place is never replaced, so no rank
    ever reads a folder that is being swapped."""
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(cache_dir)
        os.mkdir(tmp, 0o777)  # the umask applies, as for every output (utils.atomic_directory)
        try:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", array)
                if (tmp / f"{name}.npy").stat().st_size < array.nbytes:  # np.save can hide a failed last write
                    raise OSError(errno.ENOSPC, f"{name}.npy was cut short")
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, cache_dir)
            except OSError:
                if not (cache_dir / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise OSError(f"could not write the data cache {cache_dir}: {e}") from None


def load_data(data_path: str, output_dir: str, max_tokens_per_gpu: int, vocab_size: int, d: Dist) -> TokenizedData:
    """One process per node validates the JSONL and writes the cache; then every rank memory-maps it.

    Memory-mapping keeps host memory flat in the number of ranks: each rank touches only the samples it packs.
    """
    stat = os.stat(data_path)
    key = "|".join(map(str, (os.path.abspath(data_path), stat.st_size, stat.st_mtime_ns,
                             max_tokens_per_gpu, vocab_size)))
    cache_dir = Path(output_dir) / ".data_cache" / hashlib.sha1(key.encode()).hexdigest()[:16]
    error = None
    if d.local_rank == 0 and not (cache_dir / "meta.json").exists():
        try:
            arrays, dropped = read_tokenized_jsonl(data_path, max_tokens_per_gpu, vocab_size)
            fingerprint = hashlib.sha1()
            for array in arrays.values():
                fingerprint.update(array.tobytes())
            save_cache(cache_dir, arrays, {"dropped": dropped, "fingerprint": fingerprint.hexdigest()})
        except (InputError, OSError) as e:
            error = str(e)
    error = first_error(error)
    if error:
        fail_distributed(error)
    meta = json.loads((cache_dir / "meta.json").read_text())
    data = TokenizedData(**{name: np.load(cache_dir / f"{name}.npy", mmap_mode="r")
                            for name in ("input_ids", "labels", "offsets", "num_loss_tokens")},
                         fingerprint=meta["fingerprint"])
    for reason, count in meta["dropped"].items():
        if count:
            print0(f"{data_path}: dropped {count} samples: {reason}")
    return data


@dataclass
class MicroBatch:
    """One packed row: samples concatenated, positions restarting at 0, no padding."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    loss_positions: torch.Tensor  # (N,) indices into the row of tokens that predict a label
    loss_targets: torch.Tensor  # (N,) the label each of those positions predicts
    cu_seqlens: torch.Tensor  # (num_samples + 1,) int32, for variable-length attention
    max_seqlen: int
    num_tokens: int

    def to(self, device: torch.device) -> "MicroBatch":
        """Copies without waiting when the tensors are in pinned host memory."""
        tensors = {f.name: getattr(self, f.name).to(device, non_blocking=True) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **tensors)


def pack_on_host(data: TokenizedData, sample_ids: list[int], pin_memory: bool = False) -> MicroBatch:
    """Packs samples into one row. Labels are shifted within each sample, so a sample's last token never
    predicts the next sample's first token. An empty list gives a one-token row with no loss (a rank with
    fewer samples still runs every micro-batch, since FSDP's collectives must match)."""
    if not sample_ids:
        ids, positions, targets, lengths = np.zeros(1, np.int64), np.zeros(1, np.int64), np.full(1, -100), [1]
    else:
        spans = [(int(data.offsets[i]), int(data.offsets[i + 1])) for i in sample_ids]
        lengths = [end - start for start, end in spans]
        ids = np.concatenate([data.input_ids[start:end] for start, end in spans]).astype(np.int64)
        positions = np.concatenate([np.arange(length) for length in lengths])
        targets = np.concatenate([np.append(data.labels[start + 1:end], -100) for start, end in spans])
    loss_positions = np.flatnonzero(targets != -100)

    def tensor(array: np.ndarray, dtype: torch.dtype = torch.long) -> torch.Tensor:
        host = torch.as_tensor(array, dtype=dtype)
        return host.pin_memory() if pin_memory else host

    return MicroBatch(
        input_ids=tensor(ids)[None],
        position_ids=tensor(positions)[None],
        loss_positions=tensor(loss_positions),
        loss_targets=tensor(targets[loss_positions]),
        cu_seqlens=tensor(np.concatenate([[0], np.cumsum(lengths)]), torch.int32),
        max_seqlen=int(max(lengths)),
        num_tokens=int(sum(lengths)),
    )


def pack_micro_batch(data: TokenizedData, sample_ids: list[int], device: torch.device) -> MicroBatch:
    return pack_on_host(data, sample_ids).to(device)


@dataclass
class PackedStep:
    """One optimizer step: its place in the data, and this rank's micro-batches packed on the host."""

    epoch: int
    batch_index: int
    sample_ids: list[int]  # the whole batch, over all ranks
    micro_batches: list[MicroBatch]  # this rank's
    num_loss_tokens: int  # over all ranks
    num_tokens: int  # over all ranks


def pack_steps(data: TokenizedData, batches: Iterator[tuple[int, int, list[int]]], max_tokens_per_gpu: int,
               d: Dist) -> Iterator[PackedStep]:
    """Each batch split over ranks and micro-batches (sampler.distribute_batch), this rank's part packed; in
    pinned memory on CUDA, so that copying it to the GPU does not make the host wait."""
    pin_memory = d.device.type == "cuda"
    for epoch, batch_index, sample_ids in batches:
        plan = distribute_batch(sample_ids, data.lengths, d.world_size, max_tokens_per_gpu)
        yield PackedStep(epoch, batch_index, sample_ids, [pack_on_host(data, ids, pin_memory) for ids in plan[d.rank]],
                         num_loss_tokens=int(data.num_loss_tokens[sample_ids].sum()),
                         num_tokens=int(data.lengths[sample_ids].sum()))


def in_background(items: Iterator, ahead: int = 1) -> Iterator:
    """Runs `items` in a thread, up to `ahead` items ahead of the consumer: the next step is packed while the GPU
    runs this one. An exception in the thread is raised in the consumer."""
    queue: Queue = Queue(maxsize=ahead)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                queue.put((item, None))
        except BaseException as e:  # handed to the consumer
            queue.put((None, e))
        queue.put((done, None))

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item, error = queue.get()
        if error is not None:
            raise error
        if item is done:
            return
        yield item
