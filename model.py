"""The model as train.py trains it: loaded once on rank 0, attention that keeps packed samples apart, a forward that
returns the summed loss, then Liger, activation checkpointing and FSDP2 applied in that order; gradient clipping
on the shards and the FLOPs count behind MFU."""

import inspect
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from attention import packed_attention_forward
from distributed import Dist, broadcast_from_rank0, fail_distributed

if TYPE_CHECKING:
    from data import MicroBatch

# ----------------------------------------------------------------------------------------------------------------------
# Attention: packed samples never see each other.


def choose_attn_implementation(requested: str | None) -> str:
    """attention.packed_attention_forward, registered as "packed", unless another kernel is asked for. On CUDA it
    runs the flash varlen kernels (flex_attention for softcaps); on CPU, what transformers' eager attention computes.
    (transformers' own sdpa has no softcap, Gemma 2 and gpt-oss refuse it, and gpt-oss builds its eager mask
    without the packing.)"""
    from transformers import AttentionInterface

    AttentionInterface.register("packed", packed_attention_forward)
    return requested or "packed"


# ----------------------------------------------------------------------------------------------------------------------
# Loss: summed cross-entropy over the positions that have a label, on the model's own logits, never materializing
# the full fp32 logits.


def softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def summed_in_chunks(rows: torch.Tensor, targets: torch.Tensor, to_logits, zero: torch.Tensor,
                     chunk_size: int) -> torch.Tensor:
    """`zero` plus the sum of CE of to_logits(chunk) over chunks of `rows`; each chunk is recomputed in backward, so
    at most one chunk of fp32 logits exists at a time."""

    def chunk_loss(chunk: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(to_logits(chunk), t, reduction="sum")

    total = zero
    for start in range(0, rows.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(chunk_loss, rows[start:end], targets[start:end], use_reentrant=False)
    return total


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              softcap: float | None, chunk_size: int = 4096) -> torch.Tensor:
    """Sum of CE over rows of `hidden`, one chunk of logits `hidden @ weight.T` at a time."""
    # Zero, but it keeps the LM head in the graph with no loss token: every rank must reduce its gradient (FSDP).
    zero = (hidden[:0] @ weight.T).sum()
    return summed_in_chunks(hidden, targets, lambda h: softcapped((h @ weight.T).float(), softcap), zero, chunk_size)


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


def logits_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Sum of CE over rows of the model's own logits, upcast to fp32 one chunk at a time."""
    zero = logits[:0].sum()  # zero, but it keeps the head in the graph with no loss token
    return summed_in_chunks(logits, targets, lambda chunk: chunk.float(), zero, chunk_size)


def forward_with_hidden(model: torch.nn.Module, **kwargs):
    """The model's own forward, plus the decoder's last hidden state (caught with a forward hook)."""
    decoder = getattr(model, model.base_model_prefix)
    captured = {}
    hook = decoder.register_forward_hook(lambda module, args, output: captured.update(hidden=output.last_hidden_state))
    try:
        output = model(**kwargs)
    finally:
        hook.remove()
    return output, captured["hidden"]


def own_head_reason(model: torch.nn.Module) -> str | None:
    """Why the loss must take its logits from the model's own forward, or None when hidden @ lm_head.weight.T,
    soft-capped by final_logit_softcapping as the fast losses do, gives the model's logits exactly.

    Compared on a few tokens in fp32, so that any other head math (Cohere's logit_scale, Granite's logits_scaling,
    whatever a future family does) is found without a list of them. A bias is looked for, not probed: a zero bias
    would pass the probe, and the fast losses would never train it."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"its output layer is a {type(head).__name__}, not a plain Linear"
    if head.bias is not None:
        return "its lm_head has a bias"
    input_ids = torch.arange(1, 6)[None] % model.config.vocab_size
    with torch.no_grad():
        output, hidden = forward_with_hidden(model, input_ids=input_ids, use_cache=False,
                                             logits_to_keep=torch.arange(input_ids.shape[1]))
        fast = softcapped(hidden[0] @ head.weight.T, getattr(model.config, "final_logit_softcapping", None))
    own = output.logits[0]
    difference = ((fast - own).norm() / own.norm()).item()
    if difference > 1e-5:
        return (f"its logits are not hidden @ lm_head.weight.T (relative difference {difference:.2g}): its head does "
                "more, such as scaling them")
    return None


def router_aux_loss_coef(model: torch.nn.Module) -> float | None:
    """The weight of the router's auxiliary loss of an MoE model whose forward can return it, else None."""
    if "output_router_logits" not in inspect.signature(model.forward).parameters:
        return None
    return model.config.router_aux_loss_coef


class CausalLMWithSummedLoss(torch.nn.Module):
    """Wraps a Hugging Face causal LM so that its forward returns the summed loss of a packed micro-batch: the CE of
    every loss token, plus for MoE models the router's auxiliary loss the way the model's own forward adds it.

    The CE is taken on the model's own logits. Either its own forward computes them at the loss positions only
    (`own_head_reason` says why: a bias, a logit scale...), or they are hidden @ lm_head.weight.T with the model's
    final softcap, which own_head_reason found identical, computed in chunks or by Liger's fused kernel so that the
    logits of a whole micro-batch are never held at once.

    Being the FSDP root, it gathers the embeddings and LM head (tied or not) for the loss as well.
    """

    def __init__(self, model: torch.nn.Module, use_liger: bool, own_head_reason: str | None = None,
                 max_tokens_per_gpu: int | None = None, loss_impl: str | None = None):
        super().__init__()
        self.model = model
        self.max_tokens_per_gpu = max_tokens_per_gpu  # flex_attention pads every row to it (one compiled shape)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.own_head_reason = own_head_reason
        fast_loss = "liger" if use_liger else "chunked"  # or chunked_cross_entropy_sum
        self.loss_impl = loss_impl or ("own_head" if own_head_reason else fast_loss)
        self.router_aux_loss_coef = router_aux_loss_coef(model)
        # Liger cuts the rows into chunks of at most chunk_mem_const * hidden / vocab of them: its default, 1, gives
        # 128-row chunks here (Qwen's 152k vocab), each adding a full-size weight-gradient matmul; 64 gives one or
        # two chunks per micro-batch (transient logits <= 64 * rows * hidden), 11% faster (BENCHMARKS.md).
        self.liger_chunk_mem_const = 64

    def describe_loss(self) -> str:
        if self.loss_impl == "own_head":
            what = f"CE on the logits of the model's own forward at the loss positions ({self.own_head_reason})"
        else:
            what = f"{self.loss_impl} CE on hidden @ lm_head.weight.T (checked equal to the model's own logits)"
        if self.router_aux_loss_coef is not None:
            what += f", plus the router's auxiliary loss x {self.router_aux_loss_coef}"
        return what

    def refuse_unsupported(self, batch: "MicroBatch") -> None:
        """Stops the run at start, with the reason, if the trainer cannot train this model exactly: what the loss
        needs from its forward, then a forward of `batch` without gradients, in which an attention feature the kernels
        lack raises with its name (attention.packed_attention_forward)."""
        model, problem = self.model, None
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            problem = "its forward has no logits_to_keep, through which the loss takes its logits"
        elif hasattr(model.config, "router_aux_loss_coef") and self.router_aux_loss_coef is None:
            problem = ("its config weighs a router auxiliary loss (router_aux_loss_coef) that its forward cannot "
                       "return (no output_router_logits)")
        else:
            try:
                with torch.no_grad():
                    self(batch)
            except NotImplementedError as e:
                problem = str(e)
            finally:  # the root and the last layer stay gathered after a forward: the optimizer must see the shards
                for module in self.modules():
                    if isinstance(module, FSDPModule):
                        module.reshard()
        if problem:
            fail_distributed(f"cannot train {type(model).__name__} exactly: {problem}")

    def forward(self, batch: "MicroBatch") -> torch.Tensor:
        own_head = self.loss_impl == "own_head"
        extra = {}
        if self.model.config._attn_implementation == "packed":
            extra.update(packed_masks={}, packed_length=self.max_tokens_per_gpu)
        with_aux_loss = self.router_aux_loss_coef is not None and self.training  # validation: the CE alone
        if with_aux_loss:
            extra["output_router_logits"] = True
        # The model's own head runs at the loss positions, or at none when the loss applies lm_head itself.
        output, hidden = forward_with_hidden(
            self.model, input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
            logits_to_keep=batch.loss_positions if own_head else batch.loss_positions[:0],
            cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
            max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen, **extra,
        )
        aux_loss = 0.0
        if with_aux_loss:
            # The model's forward returns mean CE + coef * aux_loss; in a sum over the micro-batch's loss tokens,
            # the auxiliary loss counts once per loss token.
            aux_loss = self.router_aux_loss_coef * output.aux_loss * batch.loss_positions.numel()
        if own_head:
            return aux_loss + logits_cross_entropy_sum(output.logits[0], batch.loss_targets)
        hidden = hidden.view(-1, hidden.shape[-1]).index_select(0, batch.loss_positions)
        weight = self.model.get_output_embeddings().weight
        if self.loss_impl == "liger" and batch.loss_positions.numel() > 0:
            return aux_loss + LinearCrossEntropySum.apply(hidden, weight, batch.loss_targets, self.softcap,
                                                          self.liger_chunk_mem_const)
        return aux_loss + chunked_cross_entropy_sum(hidden, weight, batch.loss_targets, self.softcap)


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
    after sharding, so a large model is never held N times in host memory. Rank 0 also checks the head on its
    fp32 copy (own_head_reason, a forward of five tokens on the CPU) and tells the others."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(model_name_or_path)
    model_config._attn_implementation = attn_implementation
    original_dtype = model_config.dtype or torch.float32  # checkpoints are saved back in it
    head_reason = None
    if d.rank == 0:
        # eager: the probe runs on the CPU, where every family has it
        source = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32,
                                                      attn_implementation="eager")
        full_state_dict = source.state_dict()
        buffers = dict(source.named_buffers())
        head_reason = own_head_reason(source)
    else:
        full_state_dict, buffers = {}, {}
    head_reason = broadcast_from_rank0(head_reason)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.config.dtype = original_dtype  # the training copy is fp32; config.dtype only says how to save
    if d.rank == 0:  # rank 0 saves checkpoints: keep the model's own sampling defaults and stop tokens
        model.generation_config = source.generation_config
    return model, full_state_dict, buffers, head_reason


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
    # A parameter without a gradient on one rank (an expert no token of its micro-batch chose) would drop out of that
    # rank's reduce-scatter alone: collectives of different sizes abort on gloo and hang on NCCL. The loss keeps the
    # LM head in every graph; torch >= 2.13 also reduces zeros for whatever else went unused.
    if hasattr(wrapper, "set_reduce_scatter_unused_params"):
        wrapper.set_reduce_scatter_unused_params(True)


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

