"""The model as train.py trains it: loaded once on rank 0, attention that keeps packed samples apart, a forward that
returns the summed loss, then Liger, activation checkpointing and FSDP2 applied in that order; gradient clipping
on the shards and the FLOPs count behind MFU."""

import importlib.util
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from distributed import Dist

if TYPE_CHECKING:
    from data import MicroBatch

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


class LinearCrossEntropySum(torch.autograd.Function):
    """Sum of CE of `hidden @ weight.T` over rows, one chunk of logits at a time, with Liger's Triton CE kernel.

    Liger's own fused linear CE does the same but reads the count of labelled rows back to the host (`.item()`)
    in forward and compares grad_output to 1 on the host in backward: two waits of the host for the GPU per
    micro-batch. Every row here has a label (the caller selects them), the reduction is a sum, and the upstream
    gradient is applied on the GPU, so nothing is read back. Gradients are computed in forward (the logits are
    never kept); the weight gradient is accumulated in fp32 over the chunks, then kept in the weight's dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_mem_const):
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

        num_rows, vocab_size = hidden.shape[0], weight.shape[0]
        # Liger's chunking: transient logits of at most chunk_mem_const * rows * hidden elements
        chunks = -(-vocab_size // (chunk_mem_const * hidden.shape[1]))
        chunk_rows = min(num_rows, next_power_of_2(-(-num_rows // chunks)))
        loss_per_row = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, num_rows, chunk_rows):
            end = min(start + chunk_rows, num_rows)
            logits = hidden[start:end] @ weight.T  # the kernel overwrites it with its gradient
            liger_cross_entropy_kernel[(end - start,)](
                X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=targets[start:end], Y_stride=1, weight_ptr=None,
                loss_ptr=loss_per_row[start:end], z_loss_ptr=None, loss_stride=1, token_accuracy_ptr=None,
                token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=vocab_size,
                n_non_ignore=1, sum_non_ignore_weight=1, weight_sum=0.0, ignore_index=-100, lse_square_scale=0.0,
                label_smoothing=0.0, reduction="sum", softcap=softcap, RETURN_Z_LOSS=False,
                RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False,
                BLOCK_SIZE=min(32768, next_power_of_2(vocab_size)), HAS_WEIGHT=False,
                HAS_SOFTCAPPING=softcap is not None, HAS_GRADIENTS=True, num_warps=32,
            )
            torch.mm(logits, weight, out=grad_hidden[start:end])
            torch.addmm(grad_weight, logits.T, hidden[start:end], out_dtype=torch.float32, out=grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))  # as Liger keeps it: in the weight's dtype
        return loss_per_row.sum()

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors  # backward runs once: scale them in place
        return grad_hidden.mul_(grad_output), grad_weight.mul_(grad_output), None, None, None


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


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

    def forward(self, batch: "MicroBatch") -> torch.Tensor:
        decoder = getattr(self.model, self.model.base_model_prefix)
        hidden = decoder(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
            cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen,
        ).last_hidden_state
        hidden = hidden.view(-1, hidden.shape[-1]).index_select(0, batch.loss_positions)
        weight = self.model.get_output_embeddings().weight
        if self.loss_impl == "liger" and batch.loss_positions.numel() > 0:
            return LinearCrossEntropySum.apply(hidden, weight, batch.loss_targets, self.softcap,
                                               self.liger_chunk_mem_const)
        return chunked_cross_entropy_sum(hidden, weight, batch.loss_targets, self.softcap)


# ----------------------------------------------------------------------------------------------------------------------
# Model setup, one function per concern, applied in this order: load -> liger -> activation checkpointing -> FSDP.


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    decoder = getattr(model, model.base_model_prefix)
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(decoder, name, None), torch.nn.ModuleList):
            return getattr(decoder, name)
    raise ValueError(f"cannot find the list of decoder layers of {type(model).__name__}")


def model_path_problem(path: str) -> str | None:
    """What is wrong with --model-name-or-path, read as loading will read it, before any process group exists: a
    wrong path is then one line, not every rank's traceback ending in "Repo id must be in the form 'repo_name'"."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    if os.path.isfile(path):
        return f"--model-name-or-path {path} is a file; give the model's folder (the one holding config.json)"
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        return f"--model-name-or-path {path}: the folder has no config.json, so it is not a Hugging Face model"
    try:
        AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError, HFValidationError, ValueError for an unknown model type, ...
        if not os.path.exists(path):
            offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
            return (f"--model-name-or-path {path}: no such folder, and no model of that name could be reached on "
                    f"the Hugging Face Hub{offline}")
        return f"--model-name-or-path {path}: cannot read its config.json: {str(e).splitlines()[0]}"
    return None


def load_model(model_name_or_path: str, attn_implementation: str, d: Dist):
    """Rank 0 reads the weights; every other rank builds an empty (meta) model and receives its shards
    after sharding, so a large model is never held N times in host memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(model_name_or_path)
    model_config._attn_implementation = attn_implementation
    original_dtype = model_config.dtype or torch.float32  # checkpoints are saved back in it
    if d.rank == 0:
        source = AutoModelForCausalLM.from_pretrained(
            model_name_or_path, config=model_config, dtype=torch.float32,
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


def apply_compile(model: torch.nn.Module) -> None:
    """Regional torch.compile, in place of Liger's layer kernels: each decoder layer's forward is compiled, one
    graph that every layer reuses (same code), with the sequence length dynamic so that rows of any length share
    it. Norms, RoPE, SwiGLU and residual adds become a few fused kernels; FSDP's hooks stay outside."""
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, dynamic=True)


def activation_bytes_per_token(model_config) -> int:
    """bf16 activations a decoder layer keeps for backward per token, about 2 bytes x (6 x hidden + 3 x
    intermediate) (attention inputs and outputs, norms, MLP inputs); measured 68 kB for Qwen2.5-1.5B with Liger
    against 73 kB from this formula."""
    hidden = model_config.hidden_size
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * hidden
    return 2 * (6 * hidden + 3 * intermediate)


def choose_activation_checkpointing(requested: str, strategy: str, max_tokens_per_gpu: int, model_config,
                                    num_params: int, d: Dist) -> tuple[bool, str]:
    """Resolves --activation-checkpointing auto: on only when the estimated peak without it would exceed 90% of
    the GPU's memory. The estimate: 16 bytes per parameter over the ranks (fp32 weights, gradients, Adam),
    the bf16 copy of the gathered weights (all of them when nothing is resharded), and every layer's saved
    activations for a full micro-batch."""
    if requested != "auto":
        return requested == "on", f"--activation-checkpointing {requested}"
    if d.device.type != "cuda":
        return False, "auto: not on a GPU"
    layers = model_config.num_hidden_layers
    gathered = num_params  # FULL_SHARD on several ranks: embeddings/LM head plus about three layers at a time
    if d.world_size > 1 and strategy in ("FULL_SHARD", "HYBRID_SHARD"):
        gathered = model_config.vocab_size * model_config.hidden_size + 3 * num_params / layers
    states = 16 * num_params / d.world_size + 2 * gathered
    activations = max_tokens_per_gpu * layers * activation_bytes_per_token(model_config)
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

# ----------------------------------------------------------------------------------------------------------------------
# FLOPs, for MFU


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

