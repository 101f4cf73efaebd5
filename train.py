"""Full fine-tuning of a Hugging Face causal LM with FSDP2, token-budget multipacking and padding-free attention.

    torchrun --nproc-per-node=8 train.py --data-path tokenized.jsonl --model-name-or-path Qwen/Qwen2.5-1.5B-Instruct \
        --output-dir out --batch-size 128 --max-tokens-per-gpu 16384 --learning-rate 6e-6 --num-warmup-steps 20

Every optimizer step is mathematically one big batch on one device: the loss is the sum of cross-entropy over every
loss token of the step, on all ranks and micro-batches, divided by the number of those tokens.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from checkpoint import (
    MARKER,
    STATE_DIR,
    PreemptionSignal,
    Progress,
    changed_params,
    describe,
    first_error,
    is_complete,
    latest_state,
    load_state,
    read_trainer_state,
    save_state,
)
from sampler import batches_from, distribute_batch
from utils import (
    InputError,
    atomic_directory,
    atomic_write,
    fail,
    free_port,
    is_rank0,
    iter_jsonl_lines,
    parse_json_line,
    print0,
    run_and_exit,
)


# ----------------------------------------------------------------------------------------------------------------------
# Defaults: edit them here, or override any of them on the command line (--batch-size 64 ...).
@dataclass
class TrainConfig:
    data_path: str = field(default="", metadata={"help": "Tokenized JSONL written by process_data.py."})
    model_name_or_path: str = field(default="", metadata={"help": "Hub id or local folder of the model to tune."})
    output_dir: str = field(default="", metadata={"help": "Where checkpoints and metrics are written."})
    batch_size: int = field(default=128, metadata={"help": "Samples per optimizer step, over all GPUs."})
    max_tokens_per_gpu: int = field(default=16384, metadata={"help": "Token budget of one micro-batch on one GPU."})
    learning_rate: float = field(default=6e-6, metadata={"help": "Peak learning rate of AdamW."})
    num_warmup_steps: int = field(default=20, metadata={"help": "Steps of linear warmup from 0."})
    lr_scheduler: str = field(
        default="constant_with_warmup",
        metadata={"help": "LR after warmup.", "choices": ["constant_with_warmup", "cosine", "linear"]},
    )
    num_epochs: int = field(default=1, metadata={"help": "Passes over the data."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (the LR schedule still spans "
                                "--num-epochs, so a stopped run resumes exactly)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this."})
    min_samples_per_checkpoint: int = field(
        default=10000, metadata={"help": "Save a Hugging Face checkpoint (and a state) each time the samples seen "
                                  "since the last one reach this."}
    )
    save_state_every_samples: int | None = field(
        default=None, metadata={"help": "Also save a state each time the samples seen since the last one reach "
                                 "this."}
    )
    keep_last_states: int = field(default=2, metadata={"help": "Resumable states kept in output-dir/state."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest complete state in output-dir."})
    resume_from: str | None = field(default=None, metadata={"help": "Continue from this state folder."})
    force_resume: bool = field(
        default=False, metadata={"help": "Resume even if batch size, seed or data differ from the saved run."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Start over in an output-dir that holds a run (deletes its outputs)."}
    )
    max_bad_steps: int = field(
        default=5, metadata={"help": "Stop after more than this many non-finite steps in a row."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the data order and of torch."})
    use_liger_kernels: bool = field(default=False, metadata={"help": "Liger kernels and fused linear CE (GPU)."})
    fsdp_sharding_strategy: str = field(
        default="FULL_SHARD",
        metadata={
            "help": "FULL_SHARD: reshard after forward; SHARD_GRAD_OP: keep gathered until backward; "
            "HYBRID_SHARD: shard within a node, replicate across nodes; NO_SHARD: replicate.",
            "choices": ["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"],
        },
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Compute dtype (default: bf16 on GPU, fp32 on CPU).", "choices": ["bf16", "fp32"]},
    )
    activation_checkpointing: str = field(
        default="auto",
        metadata={"help": "Recompute each decoder layer in backward to save memory; auto: only if the run would "
                  "not fit without it (estimated from the model and --max-tokens-per-gpu; always off on CPU).",
                  "choices": ["auto", "on", "off"]},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel (default: flash_attention_2 if installed, else flash varlen through "
                  "torch's own kernels on CUDA, else sdpa)."},
    )


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Builds argparse from TrainConfig, so that the defaults above are the only ones."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        if f.name == "activation_checkpointing":  # a bare flag still means "on"
            parser.add_argument(flag, nargs="?", const="on", default=f.default, choices=f.metadata["choices"],
                                help=help_text + f" (default: {f.default})")
            parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const="off")
            continue
        value_type = {"int | None": int, "str | None": str}.get(str(f.type), f.type)
        required = f.default == ""
        parser.add_argument(
            flag, type=value_type, default=None if required else f.default, required=required,
            choices=f.metadata.get("choices"), help=help_text + ("" if required else f" (default: {f.default})"),
        )
    return TrainConfig(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device


def init_distributed() -> Dist:
    """Joins torchrun's process group (or makes a one-process group when run with plain python)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, local_rank, dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def fail_distributed(message: str) -> None:
    """Every rank reaches the same verdict; rank 0 says it, and all leave the process group cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if not is_rank0():
        raise SystemExit(1)
    fail(message)


# ----------------------------------------------------------------------------------------------------------------------
# Data: process_data.py's JSONL, validated once and cached as flat arrays that every rank memory-maps.


@dataclass
class TokenizedData:
    input_ids: np.ndarray  # all samples concatenated (int32)
    labels: np.ndarray  # same layout; -100 where no loss
    offsets: np.ndarray  # sample i is [offsets[i], offsets[i+1])
    num_loss_tokens: np.ndarray  # per sample: labels that are predicted, i.e. labels[1:] != -100
    fingerprint: str = ""  # sha1 of the arrays: a resumed run checks it trains on the same samples

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


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
        try:
            ids_array = np.asarray(input_ids, dtype=np.int64)
            labels_array = np.asarray(labels, dtype=np.int64)
        except (TypeError, ValueError):
            raise InputError(path, line_number, "'input_ids' and 'labels' must hold integers") from None
        if ids_array.min() < 0 or ids_array.max() >= vocab_size:
            raise InputError(path, line_number, f"token id out of the model's vocabulary (size {vocab_size})")
        bad_labels = (labels_array != -100) & ((labels_array < 0) | (labels_array >= vocab_size))
        if bad_labels.any():
            raise InputError(path, line_number, f"label out of the model's vocabulary (size {vocab_size}) "
                             "and not -100")
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


def load_data(config: TrainConfig, vocab_size: int, d: Dist) -> TokenizedData:
    """One process per node validates the JSONL and writes the cache; then every rank memory-maps it.

    Memory-mapping keeps host memory flat in the number of ranks: each rank touches only the samples it packs.
    """
    stat = os.stat(config.data_path)
    key = "|".join(map(str, (os.path.abspath(config.data_path), stat.st_size, stat.st_mtime_ns,
                             config.max_tokens_per_gpu, vocab_size)))
    cache_dir = Path(config.output_dir) / ".data_cache" / hashlib.sha1(key.encode()).hexdigest()[:16]
    error = None
    if d.local_rank == 0 and not (cache_dir / "meta.json").exists():
        try:
            arrays, dropped = read_tokenized_jsonl(config.data_path, config.max_tokens_per_gpu, vocab_size)
            fingerprint = hashlib.sha1()
            for array in arrays.values():
                fingerprint.update(array.tobytes())
            with atomic_directory(cache_dir) as tmp:
                for name, array in arrays.items():
                    np.save(tmp / f"{name}.npy", array)
                (tmp / "meta.json").write_text(json.dumps({"dropped": dropped,
                                                           "fingerprint": fingerprint.hexdigest()}))
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
            print0(f"dropped {count} samples: {reason}")
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


def pack_micro_batch(data: TokenizedData, sample_ids: list[int], device: torch.device) -> MicroBatch:
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
    to_device = lambda a, dtype=torch.long: torch.as_tensor(a, dtype=dtype).to(device, non_blocking=True)  # noqa: E731
    return MicroBatch(
        input_ids=to_device(ids)[None],
        position_ids=to_device(positions)[None],
        loss_positions=to_device(loss_positions),
        loss_targets=to_device(targets[loss_positions]),
        cu_seqlens=to_device(np.concatenate([[0], np.cumsum(lengths)]), torch.int32),
        max_seqlen=int(max(lengths)),
        num_tokens=int(sum(lengths)),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Attention: packed samples never see each other.


class _FlashVarlenCausal(torch.autograd.Function):
    """Causal flash attention over packed samples, straight on aten's flash kernels: they take fewer K/V heads
    than query heads (GQA) natively, so K and V are never repeated per query head (torch <= 2.11's varlen_attn
    demands equal head counts)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        out, lse, philox_seed, philox_offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, philox_seed, philox_offset)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, philox_seed, philox_offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_seqlen, ctx.max_seqlen, 0.0,
            True, philox_seed, philox_offset, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function on flash attention's variable-length kernel, fed with the micro-batch's
    cumulative sequence lengths (passed as forward kwargs cu_seq_lens_q / max_length_q)."""
    # (1, heads, T, dim) -> (T, heads, dim)
    q, k, v = (x.squeeze(0).transpose(0, 1) for x in (query, key, value))
    out = _FlashVarlenCausal.apply(q, k, v, kwargs["cu_seq_lens_q"], kwargs["max_length_q"], scaling)
    return out.unsqueeze(0), None


def choose_attn_implementation(requested: str | None, device: torch.device) -> str:
    """Best available kernel that isolates packed samples; registers varlen_attention_forward as "varlen"."""
    from transformers import AttentionInterface

    AttentionInterface.register("varlen", varlen_attention_forward)
    if requested:
        return requested
    if device.type != "cuda":
        return "sdpa"  # packed samples are isolated from position_ids when there is no attention_mask
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "varlen" if hasattr(torch.ops.aten, "_flash_attention_forward") else "sdpa"


# ----------------------------------------------------------------------------------------------------------------------
# Loss: summed cross-entropy over the positions that have a label, never materializing the full fp32 logits.


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              softcap: float | None, chunk_size: int = 4096) -> torch.Tensor:
    """Sum of CE over rows of `hidden`, one chunk of logits at a time; each chunk is recomputed in backward."""

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = (h @ weight.T).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, t, reduction="sum")

    total = hidden.sum() * 0.0  # keeps the graph whole when there is no loss token
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(chunk_loss, hidden[start:end], targets[start:end], use_reentrant=False)
    return total


class CausalLMWithSummedLoss(torch.nn.Module):
    """Wraps a Hugging Face causal LM so that its forward returns the summed CE of a packed micro-batch.

    Being the FSDP root, it gathers the embeddings and LM head (tied or not) for the loss as well.
    """

    def __init__(self, model: torch.nn.Module, use_liger: bool, loss_impl: str | None = None):
        super().__init__()
        self.model = model
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.loss_impl = loss_impl or ("liger" if use_liger else "chunked")  # or chunked_cross_entropy_sum
        # Liger cuts the rows into chunks of at most chunk_mem_const * hidden / vocab of them: its default, 1, gives
        # 128-row chunks here (Qwen's 152k vocab), each adding a full-size weight-gradient matmul; 64 gives one or
        # two chunks per micro-batch (transient logits <= 64 * rows * hidden), 11% faster (BENCHMARKS.md).
        self.liger_chunk_mem_const = 64

    def forward(self, batch: MicroBatch) -> torch.Tensor:
        decoder = getattr(self.model, self.model.base_model_prefix)
        hidden = decoder(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
            cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen,
        ).last_hidden_state
        hidden = hidden.view(-1, hidden.shape[-1]).index_select(0, batch.loss_positions)
        weight = self.model.get_output_embeddings().weight
        if self.loss_impl == "liger" and batch.loss_positions.numel() > 0:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            # reduction="sum": its "none" reduction had gradient bugs. fp32 accumulation of the weight gradient.
            return LigerFusedLinearCrossEntropyFunction.apply(
                hidden, weight, batch.loss_targets, None, None, -100, 0.0, 0.0, "sum", self.softcap, False,
                torch.float32, False, False, False, None, None, self.liger_chunk_mem_const)[0]
        return chunked_cross_entropy_sum(hidden, weight, batch.loss_targets, self.softcap)


# ----------------------------------------------------------------------------------------------------------------------
# Model setup, one function per concern, applied in this order: load -> liger -> activation checkpointing -> FSDP.


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    decoder = getattr(model, model.base_model_prefix)
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(decoder, name, None), torch.nn.ModuleList):
            return getattr(decoder, name)
    raise ValueError(f"cannot find the list of decoder layers of {type(model).__name__}")


def load_model(config: TrainConfig, attn_implementation: str, d: Dist):
    """Rank 0 reads the weights; every other rank builds an empty (meta) model and receives its shards
    after sharding, so a large model is never held N times in host memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(config.model_name_or_path)
    model_config._attn_implementation = attn_implementation
    original_dtype = model_config.dtype or torch.float32  # checkpoints are saved back in it
    if d.rank == 0:
        source = AutoModelForCausalLM.from_pretrained(
            config.model_name_or_path, config=model_config, dtype=torch.float32,
        )
        full_state_dict = source.state_dict()
        buffers = dict(source.named_buffers())
    else:
        full_state_dict, buffers = {}, {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.config.dtype = original_dtype  # the training copy is fp32; config.dtype only says how to save
    if d.rank == 0:  # rank 0 saves checkpoints: keep the model's own sampling defaults and stop tokens
        model.generation_config = source.generation_config
    return model, full_state_dict, buffers


def apply_liger(model: torch.nn.Module) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE kernels; the loss is handled by CausalLMWithSummedLoss."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def activation_bytes_per_token(model_config) -> int:
    """bf16 activations a decoder layer keeps for backward per token, about 2 bytes x (6 x hidden + 3 x
    intermediate) (attention inputs and outputs, norms, MLP inputs); measured 68 kB for Qwen2.5-1.5B with Liger
    against 73 kB from this formula."""
    hidden = model_config.hidden_size
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * hidden
    return 2 * (6 * hidden + 3 * intermediate)


def choose_activation_checkpointing(config: TrainConfig, model_config, num_params: int, d: Dist) -> tuple[bool, str]:
    """Resolves --activation-checkpointing auto: on only when the estimated peak without it would exceed 90% of
    the GPU's memory. The estimate: 16 bytes per parameter over the ranks (fp32 weights, gradients, Adam),
    the bf16 copy of the gathered weights (all of them when nothing is resharded), and every layer's saved
    activations for a full micro-batch."""
    if config.activation_checkpointing != "auto":
        return config.activation_checkpointing == "on", f"--activation-checkpointing {config.activation_checkpointing}"
    if d.device.type != "cuda":
        return False, "auto: not on a GPU"
    layers = model_config.num_hidden_layers
    gathered = num_params  # FULL_SHARD on several ranks: embeddings/LM head plus about three layers at a time
    if d.world_size > 1 and config.fsdp_sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD"):
        gathered = model_config.vocab_size * model_config.hidden_size + 3 * num_params / layers
    states = 16 * num_params / d.world_size + 2 * gathered
    activations = config.max_tokens_per_gpu * layers * activation_bytes_per_token(model_config)
    total = torch.cuda.get_device_properties(d.device).total_memory
    estimate = states + activations
    use = estimate > 0.9 * total
    reason = (f"auto: estimated peak without it {estimate / 1e9:.1f} GB (weights/grads/Adam {states / 1e9:.1f} GB + "
              f"activations {activations / 1e9:.1f} GB) {'>' if use else '<='} 90% of {total / 1e9:.1f} GB")
    return use, reason


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recomputes each decoder layer in backward (transformers renamed the method in 5.2x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_mesh(strategy: str, d: Dist) -> DeviceMesh:
    """1-D mesh for FULL_SHARD/SHARD_GRAD_OP; 2-D (replicate, shard) for HYBRID_SHARD and NO_SHARD."""
    device_type = d.device.type
    if strategy == "HYBRID_SHARD":
        num_nodes = d.world_size // d.local_world_size
        return init_device_mesh(device_type, (num_nodes, d.local_world_size), mesh_dim_names=("replicate", "shard"))
    if strategy == "NO_SHARD":
        return init_device_mesh(device_type, (d.world_size, 1), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (d.world_size,), mesh_dim_names=("shard",))


def apply_fsdp(wrapper: CausalLMWithSummedLoss, strategy: str, compute_dtype: torch.dtype, d: Dist) -> None:
    """fully_shard on each decoder layer, then the root (which keeps embeddings and LM head, tied or not).

    Master weights stay fp32; compute runs in `compute_dtype`; gradients are reduced in fp32.
    """
    mesh = build_mesh(strategy, d)
    mp_policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    reshard_after_forward = strategy != "SHARD_GRAD_OP"
    layers = decoder_layers(wrapper.model)
    for i, layer in enumerate(layers):
        # The last layer's weights are needed again as soon as backward starts: keep them gathered.
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy,
                    reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    # The root (embeddings, LM head) is used at the end of forward and the start of backward: keep it too.
    fully_shard(wrapper, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)


def materialize_weights(wrapper: CausalLMWithSummedLoss, full_state_dict: dict, buffers: dict, d: Dist) -> None:
    """Allocates the sharded parameters and fills them from rank 0's full state dict."""
    model = wrapper.model
    model.to_empty(device=d.device)
    set_model_state_dict(model, full_state_dict,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():  # non-persistent buffers such as RoPE's inv_freq
        if d.rank == 0:
            buffer.copy_(buffers[name].to(d.device))
        dist.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def lr_factor(step: int, num_warmup_steps: int, total_steps: int, scheduler: str) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based).

    Warmup rises linearly from 0: step / num_warmup_steps. Then constant, or cosine / linear decay that
    reaches 0 at the last step (total_steps - 1).
    """
    if step < num_warmup_steps:
        return step / num_warmup_steps
    if scheduler == "constant_with_warmup":
        return 1.0
    decay_steps = max(1, total_steps - 1 - num_warmup_steps)
    progress = min(1.0, (step - num_warmup_steps) / decay_steps)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if scheduler == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr scheduler {scheduler}")


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=config.weight_decay, fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def matmul_params(model_config) -> int:
    """Parameters that take part in a matmul per token: every linear layer plus the LM head."""
    hidden = model_config.hidden_size
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * model_config.intermediate_size
    return model_config.num_hidden_layers * (attention + mlp) + hidden * model_config.vocab_size


def step_flops(model_config, sample_lengths: np.ndarray) -> float:
    """Model FLOPs of one training step (forward + backward): 6 per matmul parameter per token, plus causal
    attention, 6 * layers * hidden * len^2 per sample (QK^T and AV, 2 FLOPs each per pair, halved by the mask,
    times 3 for forward and backward)."""
    num_tokens = float(sample_lengths.sum())
    attention = 6.0 * model_config.num_hidden_layers * model_config.hidden_size * float((sample_lengths ** 2).sum())
    return 6.0 * matmul_params(model_config) * num_tokens + attention


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU from its datasheet, or None where unknown (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def report_host_memory(d: Dist) -> None:
    """Prints every rank's peak host RSS: only rank 0 reads the weights, so the others should stay small."""
    import resource

    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux
    per_rank = [None] * d.world_size
    dist.all_gather_object(per_rank, round(peak_rss_gb, 2))
    print0(f"host peak RSS per rank (GB): {per_rank}")


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints (the resumable state is checkpoint.py's)


def hf_checkpoint_path(config: TrainConfig, samples_seen: int) -> Path:
    return Path(config.output_dir) / "hf_format" / f"samples_{samples_seen}"


def save_hf_checkpoint(wrapper: CausalLMWithSummedLoss, tokenizer, config: TrainConfig, samples_seen: int,
                       d: Dist) -> str | None:
    """Gathers the full weights to CPU on rank 0 and writes them in Hugging Face format, in the model's original
    dtype, into a temporary folder renamed at the end: a crash never leaves a half checkpoint.

    Returns None, or what failed (the same on every rank): a full disk costs this checkpoint, not the run."""
    model = wrapper.model
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = hf_checkpoint_path(config, samples_seen)
    error = None
    if d.rank == 0:
        save_dtype = model.config.dtype
        if isinstance(save_dtype, str):
            save_dtype = getattr(torch, save_dtype)
        state_dict = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        try:
            with atomic_directory(path) as tmp:
                model.save_pretrained(tmp, state_dict=state_dict, max_shard_size="5GB")
                model.config.dtype = save_dtype  # save_pretrained wrote the fp32 training copy's dtype
                model.config.save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            print0(f"saved {path}")
        except Exception as e:  # disk full, permission: safetensors and transformers raise their own types
            error = f"could not save the Hugging Face checkpoint {path}: {describe(e)}"
    return first_error(error)


@dataclass
class Checkpointer:
    """Saves Hugging Face checkpoints and resumable states of the run. A failed save (full disk, permission) is
    reported and costs only itself: the earlier checkpoints and states stay intact and training goes on."""

    wrapper: CausalLMWithSummedLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: object
    config: TrainConfig
    run_params: dict
    d: Dist

    def save(self, progress: Progress, hf: bool) -> bool:
        """A Hugging Face checkpoint (when `hf`) and a state of this step; True if both were written."""
        samples_seen = progress.samples_seen
        errors = [
            save_hf_checkpoint(self.wrapper, self.tokenizer, self.config, samples_seen, self.d) if hf else None,
            save_state(self.config.output_dir, self.wrapper, self.optimizer, self.scheduler, progress,
                       self.run_params, self.config.keep_last_states),
        ]
        for error in filter(None, errors):
            if self.d.rank == 0:
                print(f"error: {error}", file=sys.stderr, flush=True)
        return not any(errors)

    def missing(self, progress: Progress) -> tuple[bool, bool]:
        """Whether the Hugging Face checkpoint and the state of this step are still to be written (rank 0 looks)."""
        state_path = Path(self.config.output_dir) / STATE_DIR / f"step_{progress.step}"
        return broadcast_from_rank0((not hf_checkpoint_path(self.config, progress.samples_seen).is_dir(),
                                     not is_complete(state_path)))


def save_due(samples_seen: int, samples_at_last_save: int, every: int | None) -> bool:
    """A save is due each time the samples seen since the last one reach `every`. The counters are part of
    the saved state, so a resumed run saves at the same moments as an uninterrupted one."""
    return every is not None and samples_seen - samples_at_last_save >= every


# ----------------------------------------------------------------------------------------------------------------------
# Training


def validate(config: TrainConfig) -> list[str]:
    """Every problem with the arguments at once, each with what to do."""
    problems = []
    if not os.path.isfile(config.data_path):
        problems.append(f"--data-path {config.data_path} does not exist")
    for name in ("batch_size", "max_tokens_per_gpu", "num_epochs", "min_samples_per_checkpoint", "keep_last_states"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("num_warmup_steps", "max_bad_steps"):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("max_steps", "save_state_every_samples"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    if config.overwrite and (config.resume or config.resume_from):
        problems.append("--overwrite starts over, --resume and --resume-from continue: pick one")
    if config.resume_from and not is_complete(config.resume_from):
        problems.append(f"--resume-from {config.resume_from} is not a complete state (no {MARKER} marker); "
                        f"pick a step_<S> folder of output-dir/{STATE_DIR}, or use --resume for the newest")
    if config.use_liger_kernels and not torch.cuda.is_available():
        problems.append("--use-liger-kernels needs a CUDA GPU (Liger's kernels are Triton); leave it out on CPU")
    return problems


def choose_resume_state(config: TrainConfig, d: Dist) -> Path | None:
    """The state to continue from, decided on rank 0. An output dir that holds a run is never written over
    silently: it is resumed, or started over with --overwrite, which deletes the earlier run's outputs."""
    output_dir = Path(config.output_dir)
    verdict, error = None, None
    if d.rank == 0:
        if config.resume_from:
            verdict = Path(config.resume_from)
        elif config.resume:
            verdict = latest_state(output_dir)
            if verdict is None:
                print0(f"--resume: no complete state in {output_dir / STATE_DIR}; starting fresh")
        earlier = [name for name in ("training_metrics.jsonl", "hf_format", STATE_DIR)
                   if (output_dir / name).exists()]
        if earlier and config.overwrite:
            print0(f"--overwrite: deleting {', '.join(earlier)} of the earlier run in {output_dir}")
            for name in (*earlier, "training_params.json"):
                target = output_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        elif earlier and verdict is None and not config.resume:
            error = (f"--output-dir {output_dir} already holds a run ({', '.join(earlier)}); pass --resume to "
                     "continue it, or --overwrite to start over (deletes its checkpoints, states and metrics)")
    verdict, error = broadcast_from_rank0((verdict, error))
    if error:
        fail_distributed(error)
    return verdict


def broadcast_from_rank0(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_resume_params(saved: dict, run_params: dict, config: TrainConfig, path: Path) -> None:
    """Refuses a resume whose data order would differ from the saved run's, unless --force-resume."""
    breaking, other = changed_params(saved, run_params)
    if breaking and not config.force_resume:
        fail_distributed(f"cannot resume from {path}: the data order would change ({'; '.join(breaking)}). "
                         "Resume with the saved settings, or pass --force-resume to continue anyway")
    for change in breaking + other:
        print0(f"resuming with a changed setting: {change}")


def clip_grad_norm(wrapper: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ computed on the local gradient shards (a handful of foreach kernels), then summed over the
    shard group: the same result as on the DTensors, without DTensor's per-tensor dispatch on the host."""
    grads = [p.grad for p in wrapper.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    squared = torch.stack(torch._foreach_norm(local, 2.0)).float().square().sum()
    if isinstance(grads[0], DTensor):
        mesh = grads[0].device_mesh
        shard_mesh = mesh["shard"] if mesh.mesh_dim_names and "shard" in mesh.mesh_dim_names else mesh
        if shard_mesh.size() > 1:
            dist.all_reduce(squared, group=shard_mesh.get_group())
    norm = squared.sqrt()
    torch._foreach_mul_(local, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def train_step(wrapper, optimizer, scheduler, data: TokenizedData, plan: list[list[list[int]]], config: TrainConfig,
               d: Dist, inject_nan: bool = False) -> dict:
    """One optimizer step over one global batch, split by `plan` into ranks and micro-batches.

    A non-finite loss or gradient norm drops the step's gradients and skips both the optimizer and the LR
    scheduler, so the schedule counts the updates actually applied. Every rank sees the same all-reduced
    values, so all agree on the skip.
    """
    all_ids = [i for rank_plan in plan for micro in rank_plan for i in micro]
    num_loss_tokens = int(data.num_loss_tokens[all_ids].sum())
    loss_scale = d.world_size / num_loss_tokens  # FSDP averages gradients over ranks; we want the global sum
    loss_sum = torch.zeros((), device=d.device)
    for sample_ids in plan[d.rank]:
        batch = pack_micro_batch(data, sample_ids, d.device)
        ce_sum = wrapper(batch)
        if inject_nan:
            ce_sum = ce_sum * float("nan")
        (ce_sum * loss_scale).backward()
        loss_sum += ce_sum.detach()
    grad_norm = clip_grad_norm(wrapper, config.max_grad_norm)
    dist.all_reduce(loss_sum)
    loss, grad_norm = loss_sum.item() / num_loss_tokens, grad_norm.item()
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    lr = scheduler.get_last_lr()[0]
    if not skipped:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": lr,
        "skipped": skipped,
        "num_samples": len(all_ids),
        "num_loss_tokens": num_loss_tokens,
        "num_tokens": int(data.lengths[all_ids].sum()),
        "micro_batches": len(plan[d.rank]),
    }


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    problems = validate(config)
    if problems:
        fail("\n  ".join(["invalid arguments:", *problems]))
    d = init_distributed()
    preemption = PreemptionSignal()
    torch.manual_seed(config.seed)
    resume_path = choose_resume_state(config, d)
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    # Data
    model_config = AutoConfig.from_pretrained(config.model_name_or_path)
    data = load_data(config, model_config.vocab_size, d)
    if len(data) == 0:
        fail_distributed(f"{config.data_path}: no usable sample (empty file, or every sample was dropped)")
    if config.batch_size > len(data):
        fail_distributed(f"--batch-size {config.batch_size} is larger than the dataset "
                         f"({len(data)} usable samples); lower it")
    # The schedule always spans the epochs; --max-steps only stops early, so a run stopped by it and resumed
    # follows the same LR curve as one that never stopped.
    total_steps = math.ceil(len(data) / config.batch_size) * config.num_epochs
    stop_step = min(total_steps, config.max_steps or total_steps)
    run_params = {**dataclasses.asdict(config), "world_size": d.world_size, "total_steps": total_steps,
                  "num_samples": len(data), "data_fingerprint": data.fingerprint}
    if resume_path is not None:
        check_resume_params(read_trainer_state(resume_path)["run_params"], run_params, config, resume_path)

    # Model
    compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[config.dtype or
                                                                    ("bf16" if d.device.type == "cuda" else "fp32")]
    attn_implementation = choose_attn_implementation(config.attn_implementation, d.device)
    model, full_state_dict, buffers = load_model(config, attn_implementation, d)
    if config.use_liger_kernels:
        apply_liger(model)
    num_params = sum(p.numel() for p in model.parameters())
    use_checkpointing, why = choose_activation_checkpointing(config, model_config, num_params, d)
    print0(f"activation checkpointing {'on' if use_checkpointing else 'off'} ({why})")
    if use_checkpointing:
        apply_activation_checkpointing(model)
    wrapper = CausalLMWithSummedLoss(model, config.use_liger_kernels)
    apply_fsdp(wrapper, config.fsdp_sharding_strategy, compute_dtype, d)
    materialize_weights(wrapper, full_state_dict, buffers, d)
    del full_state_dict, buffers
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path) if d.rank == 0 else None
    print0(f"model {config.model_name_or_path}: {num_params / 1e6:.1f}M parameters, "
           f"attention {attn_implementation}, compute {compute_dtype}, {d.world_size} ranks, "
           f"{config.fsdp_sharding_strategy}")

    # Optimizer
    optimizer = build_optimizer(wrapper, config, d.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.num_warmup_steps, total_steps, config.lr_scheduler))

    # Resume
    progress = Progress()
    if resume_path is not None:
        progress = load_state(resume_path, wrapper, optimizer, scheduler)
        print0(f"resumed from {resume_path}: step {progress.step}, epoch {progress.epoch}, "
               f"batch {progress.batch_index} of the epoch, {progress.samples_seen} samples seen")

    # Loop
    output_dir = Path(config.output_dir)
    if d.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(output_dir / "training_params.json") as f:
            json.dump({**run_params, "attn_implementation": attn_implementation}, f, indent=2)
    metrics_file = open(output_dir / "training_metrics.jsonl", "a") if d.rank == 0 else None  # noqa: SIM115
    peak_flops = device_peak_flops(d.device)
    # Test hook: these steps' losses are multiplied by NaN, to exercise the non-finite path end to end.
    nan_steps = {int(s) for s in os.environ.get("MINI_TRAINER_TEST_NAN_STEPS", "").split(",") if s}
    progress_bar = tqdm(total=stop_step, initial=progress.step, disable=d.rank != 0, desc="train")
    checkpointer = Checkpointer(wrapper, optimizer, scheduler, tokenizer, config, run_params, d)
    start_time, preempted = time.time(), False
    for epoch, batch_index, batch_ids in batches_from(len(data), config.batch_size, config.seed, config.num_epochs,
                                                      progress.epoch, progress.batch_index):
        if progress.step >= stop_step:
            break
        step_start = time.time()
        plan = distribute_batch(batch_ids, data.lengths, d.world_size, config.max_tokens_per_gpu)
        metrics = train_step(wrapper, optimizer, scheduler, data, plan, config, d,
                             inject_nan=progress.step + 1 in nan_steps)
        progress.step += 1
        progress.epoch, progress.batch_index = epoch, batch_index + 1
        progress.samples_seen += metrics["num_samples"]
        progress.bad_steps += metrics["skipped"]
        progress.bad_steps_in_a_row = progress.bad_steps_in_a_row + 1 if metrics["skipped"] else 0
        step, step_time = progress.step, time.time() - step_start
        flops = step_flops(model_config, data.lengths[batch_ids])
        metrics.update(
            step=step, epoch=epoch, bad_steps=progress.bad_steps, tokens_per_second=metrics["num_tokens"] / step_time,
            mfu=flops / step_time / (peak_flops * d.world_size) if peak_flops else None,
            peak_memory_gb=torch.cuda.max_memory_allocated(d.device) / 1e9 if d.device.type == "cuda" else None,
            elapsed_s=time.time() - start_time,
        )
        if metrics_file is not None:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
        progress_bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
        progress_bar.update(1)
        if metrics["skipped"]:
            print0(f"step {step}: non-finite loss {metrics['loss']} or gradient norm {metrics['grad_norm']}; "
                   f"skipped the update ({progress.bad_steps_in_a_row} in a row)")
        if progress.bad_steps_in_a_row > config.max_bad_steps:
            fail_distributed(f"{progress.bad_steps_in_a_row} non-finite steps in a row (up to step {step}), more "
                             f"than --max-bad-steps {config.max_bad_steps}: stopping without saving. The weights "
                             "were never updated by those steps; the newest saved state is "
                             f"{latest_state(output_dir)}. Lower the learning rate or check the data")
        if save_due(progress.samples_seen, progress.samples_at_last_checkpoint, config.min_samples_per_checkpoint):
            progress.samples_at_last_checkpoint = progress.samples_at_last_state = progress.samples_seen
            checkpointer.save(progress, hf=True)
        elif save_due(progress.samples_seen, progress.samples_at_last_state, config.save_state_every_samples):
            progress.samples_at_last_state = progress.samples_seen
            checkpointer.save(progress, hf=False)
        if preemption.agreed(d.device):
            preempted = True
            print0(f"received {preemption.received or 'a signal on another rank'}: stopping after step {step}")
            break
    progress_bar.close()

    # Final save: whatever the last step lacks. A preempted run saves only its state, the fast part.
    hf_missing, state_missing = checkpointer.missing(progress)
    save_hf = hf_missing and not preempted
    if (save_hf or state_missing) and not checkpointer.save(progress, hf=save_hf):
        fail_distributed("the final save failed (see above); the earlier checkpoints and states are intact")
    if metrics_file is not None:
        metrics_file.close()
    report_host_memory(d)
    cleanup_distributed()


if __name__ == "__main__":
    run_and_exit(main)
