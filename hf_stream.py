"""A Hugging Face checkpoint written one tensor at a time: the safetensors header is known from names, shapes and
dtypes alone, so each tensor is gathered from the shards, written, and dropped before the next one.

Rank 0 never holds more than one full tensor in host memory (the whole model at once would be 4 bytes per
parameter for a fp32 gather: 28 GB for a 7B model), and every rank takes part in each gather in the same order,
so the others wait in the next gather (seconds) rather than in one long collective while rank 0 writes.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
MAX_SHARD_BYTES = 5 * 10**9  # as save_pretrained(max_shard_size="5GB")


def saved_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The parameters and persistent buffers a Hugging Face checkpoint of `model` holds, by their saved name: tied
    weights once (the name transformers keeps). None when transformers renames or merges weights on save (MoE
    experts), which needs all of them at once, or when this transformers lacks the helpers that say so."""
    try:  # transformers' own rules for what save_pretrained keeps; a version without them falls back to it
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        return None

    # Meta stand-ins: transformers finds tied weights through the model's own parameter objects for meta tensors.
    meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in model.state_dict().items()}
    kept = remove_tied_weights_from_state_dict(meta, model)
    if list(revert_weight_conversion(model, dict(kept))) != list(kept):
        return None
    return {name: model.get_parameter_or_buffer(name) for name in kept}


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Names in order, cut into files of at most max_shard_bytes (a larger tensor gets a file of its own)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, size in sizes.items():
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    return shards


def gathered(tensors: dict[str, torch.Tensor], dtype: torch.dtype, on_this_rank: bool) -> Iterator[torch.Tensor | None]:
    """Each tensor in full, floating ones cast to `dtype` before the gather (half the traffic for bf16), on the
    host of the rank that writes; None elsewhere. Every rank must run it to the end: each DTensor is a collective."""
    for tensor in tensors.values():
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield tensor.cpu() if on_this_rank else None
        del tensor


def write_safetensors(path: Path, header: dict[str, tuple[torch.dtype, list[int]]],
                      tensors: Iterator[torch.Tensor]) -> None:
    """Writes a safetensors file from its header (name -> dtype, shape) and then the tensors, in header order."""
    entries, offset = {}, 0
    for name, (dtype, shape) in header.items():
        size = torch.Size(shape).numel() * dtype.itemsize
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    entries["__metadata__"] = {"format": "pt"}
    header_bytes = json.dumps(entries, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name, (dtype, shape) in header.items():
            tensor = next(tensors)
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, expected {dtype} {shape}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                  full_tensors: Iterator[torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors plus their index, as save_pretrained names them."""
    header = {name: (dtype if t.is_floating_point() else t.dtype, list(t.shape)) for name, t in tensors.items()}
    sizes = {name: torch.Size(shape).numel() * d.itemsize for name, (d, shape) in header.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards, strict=True):
        write_safetensors(directory / file, {name: header[name] for name in names}, full_tensors)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: file for file, names in zip(files, shards, strict=True) for name in names}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
