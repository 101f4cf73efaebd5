"""Attention for packed rows: each sample of a micro-batch attends only to itself, with everything the model's own
attention does (per-layer sliding windows, sinks, dropout, the scaling, attention-logit softcapping), or an error that
names what is missing.

transformers calls `packed_attention_forward` in place of its own attention (registered as "packed"), with the
micro-batch's cumulative sequence lengths among the forward kwargs. On CUDA, without a softcap, it runs aten's flash
variable-length kernels, which take the window and the dropout; sinks are folded into their softmax's normalizer.
With a softcap, which those kernels lack, it runs flex_attention with a block mask built from the sequence lengths and
the window, and the softcap as a score_mod. On CPU it computes what transformers' eager attention computes, under a
mask built the same way: a reference the GPU kernels are tested against, and the CPU path of every family (Gemma 2
and gpt-oss included, which sdpa refuses, and whose eager mask gpt-oss builds without the packing).
"""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# Forward kwargs that transformers hands every attention function and that change nothing in the attention itself
# (ours: packed_masks, the micro-batch's masks built once per window and shared by the layers, and packed_length,
# the token budget of a micro-batch, to which flex_attention pads every row).
BOOKKEEPING_KWARGS = frozenset({
    "position_ids", "use_cache", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "output_attentions", "output_hidden_states", "output_router_logits", "packed_masks", "packed_length",
})


class FlashVarlenCausal(torch.autograd.Function):
    """Causal flash attention over packed samples, straight on aten's flash kernels: they take fewer K/V heads than
    query heads (GQA) natively, so K and V are never repeated per query head, and a sliding window and dropout.

    Sinks (gpt-oss) are one more logit per head in every row's softmax, whose value vector is zero. Forward rescales
    the kernel's output by exp(lse - lse_with_sink); backward hands the kernel that output and lse_with_sink, from
    which it recomputes the probabilities with the sink, and d loss / d sink = -sum over rows of
    p_sink * <grad_out, out>."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, window, dropout, sinks):
        # A window of w tokens: the token itself and the w - 1 before it (transformers' sliding_window semantics).
        ctx.window = (window - 1, 0) if window is not None else (None, None)
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout, True, False, scale=scale,
            window_size_left=ctx.window[0], window_size_right=ctx.window[1])
        if sinks is not None:
            if lse.shape != (q.shape[1], q.shape[0]):
                raise NotImplementedError(f"attention sinks: this torch's flash kernel returns its log-sum-exp with "
                                          f"shape {tuple(lse.shape)}, not (heads, tokens)")
            lse_with_sink = torch.logaddexp(lse, sinks.float()[:, None])
            out = (out.float() * torch.exp(lse - lse_with_sink).T[..., None]).to(out.dtype)
            lse = lse_with_sink
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused, sinks)
        ctx.max_seqlen, ctx.scale, ctx.dropout = max_seqlen, scale, dropout
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, rng_state, unused, sinks = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out, q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_seqlen, ctx.max_seqlen, ctx.dropout, True,
            rng_state, unused, scale=ctx.scale, window_size_left=ctx.window[0], window_size_right=ctx.window[1])
        grad_sinks = None
        if sinks is not None:
            sink_probability = torch.exp(sinks.float()[:, None] - lse)  # (heads, tokens)
            grad_sinks = -(sink_probability * (grad_out.float() * out.float()).sum(-1).T).sum(1).to(sinks.dtype)
        return dq, dk, dv, None, None, None, None, None, grad_sinks


def sample_of_token(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """The sample each of `length` positions belongs to; a position past the packed samples (flex's padding) is a
    sample of its own."""
    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.where(positions < cu_seqlens[-1], torch.searchsorted(cu_seqlens[1:], positions, right=True),
                       positions + len(cu_seqlens))


def attends(sample: torch.Tensor, q_idx, kv_idx, window):
    """Whether query token q_idx sees key token kv_idx: causal, in the same sample, within the last `window` tokens."""
    keep = (sample[q_idx] == sample[kv_idx]) & (q_idx >= kv_idx)
    return keep & (q_idx - kv_idx < window) if window is not None else keep


def reference_attention(module, query, key, value, keep, scale, softcap, sinks, dropout):
    """transformers' eager attention (GQA, scaling, softcap, sinks, dropout) under the (tokens, tokens) mask `keep`.
    (1, heads, tokens, dim) inputs -> (1, tokens, heads, dim)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    scores = (query @ key.transpose(2, 3)) * (scale if scale is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~keep, float("-inf"))
    if sinks is not None:  # one more logit per head in each row, with a zero value vector
        scores = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2)


@functools.cache
def compiled_flex_attention():
    """flex_attention is fast only compiled: once per process, for static shapes (torch 2.11's dynamic-shape
    flex_attention found no kernel for a packed row whose length changed)."""
    return torch.compile(flex_attention, dynamic=False)


def flex_softcap_attention(query, key, value, cu_seqlens, window, softcap, scale, length: int, block_masks: dict):
    """(1, heads, tokens, dim) inputs -> (1, tokens, heads, dim), scores soft-capped as softcap * tanh(s / softcap).

    The row is padded to `length` tokens (the micro-batch budget), rounded up to flex's 128-token blocks, so that
    every call has the same shape and the compiled kernel is reused; each padding token is a sample of its own, so
    its blocks cost next to nothing. The window is a tensor, so that every layer, windowed or not, runs one compiled
    graph."""
    num_tokens = query.shape[2]
    length = -(-max(length, num_tokens) // 128) * 128
    if window not in block_masks:
        sample = sample_of_token(cu_seqlens, length)
        limit = torch.tensor(window if window is not None else length + 1, device=query.device)
        block_masks[window] = create_block_mask(
            lambda batch, head, q_idx, kv_idx: attends(sample, q_idx, kv_idx, limit), None, None, length, length,
            device=query.device, _compile=query.is_cuda)

    def softcap_scores(score, batch, head, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    pad = (0, 0, 0, length - num_tokens)
    attend = compiled_flex_attention() if query.is_cuda else flex_attention
    out = attend(*(F.pad(x, pad) for x in (query, key, value)), score_mod=softcap_scores,
                 block_mask=block_masks[window], scale=scale, enable_gqa=key.shape[1] != query.shape[1])
    return out[:, :, :num_tokens].transpose(1, 2)


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers attention function over a packed row (batch of 1), fed with the micro-batch's cumulative
    sequence lengths (forward kwargs cu_seq_lens_q / max_length_q; without them the row is one sample). Whatever the
    model passes that is not implemented here raises NotImplementedError with its name: the run refuses it rather than
    drop it."""
    unknown = sorted(name for name, value in kwargs.items() if name not in BOOKKEEPING_KWARGS and value is not None)
    if not getattr(module, "is_causal", True):
        unknown.append("non-causal attention")
    cuda = query.is_cuda
    if cuda and softcap is not None and (s_aux is not None or dropout):
        unknown.append("attention logit softcapping together with " + ("sinks" if s_aux is not None else "dropout"))
    if unknown:
        raise NotImplementedError(f"{type(module).__name__} asks for {', '.join(unknown)}, which mini_trainer's "
                                  "packed attention does not implement")
    if query.shape[0] != 1:
        raise NotImplementedError("packed attention takes one packed row, not a batch of rows")
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None:  # not a packed row: a single sample
        max_seqlen = query.shape[2]
        cu_seqlens = torch.tensor([0, max_seqlen], dtype=torch.int32, device=query.device)
    if cuda and softcap is None:
        # (1, heads, T, dim) -> (T, heads, dim)
        q, k, v = (x.squeeze(0).transpose(0, 1) for x in (query, key, value))
        out = FlashVarlenCausal.apply(q, k, v, cu_seqlens, max_seqlen, scaling, sliding_window, dropout, s_aux)
        return out.unsqueeze(0), None
    masks = kwargs.get("packed_masks")
    masks = {} if masks is None else masks
    if cuda:
        return flex_softcap_attention(query, key, value, cu_seqlens, sliding_window, softcap, scaling,
                                      kwargs.get("packed_length") or 0, masks), None
    if sliding_window not in masks:
        positions = torch.arange(query.shape[2], device=query.device)
        masks[sliding_window] = attends(sample_of_token(cu_seqlens, query.shape[2]), positions[:, None],
                                        positions[None, :], sliding_window)
    return reference_attention(module, query, key, value, masks[sliding_window], scaling, softcap, s_aux,
                               dropout), None
