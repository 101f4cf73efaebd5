"""attention.py on CPU: the flash path's window and sink arithmetic on stand-in kernels, the flex path's mask and
softcap (forward: flex has no backward on CPU), against the model's own eager attention one sample at a time; and
the refusal of what the kernels lack. tests/test_gpu.py runs the real kernels."""

import types

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

import attention

HEADS, KV_HEADS, DIM = 4, 2, 16
LENGTHS = (7, 12, 5)


def packed_inputs(seed=0, dtype=torch.float64):
    """(1, heads, tokens, dim) query, key and value for samples of LENGTHS, and their cumulative lengths."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    q, k, v = (torch.randn(1, heads, total, DIM, generator=generator, dtype=dtype, requires_grad=True)
               for heads in (HEADS, KV_HEADS, KV_HEADS))
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_seqlens


def eager_per_sample(eager, module, q, k, v, cu_seqlens, window, **kwargs):
    """The model's own eager attention on each sample alone, under its causal (and sliding-window) mask."""
    outputs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        n = end - start
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        keep = (i >= j) & ((i - j < window) if window is not None else True)
        mask = torch.zeros(n, n, dtype=q.dtype).masked_fill(~keep, float("-inf"))
        out, _ = eager(module, q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], mask, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1)  # (1, tokens, heads, dim)


def fake_module(**attributes):
    return types.SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, head_dim=DIM, training=False, **attributes)


def stand_in_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, scale=None,
                           window_size_left=None, window_size_right=None):
    """aten._flash_attention_forward's contract in plain torch: (tokens, heads, dim) in, output and the log-sum-exp
    of each row's scores, (heads, tokens), out."""
    scores = stand_in_scores(q, k, cu_q, scale, window_size_left)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("hts,shd->thd", torch.exp(scores - lse[..., None]), repeat_heads(v, q))
    return out, lse.float(), torch.zeros(2), torch.zeros(()), None


def stand_in_flash_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout, causal, rng_state, unused,
                            scale=None, window_size_left=None, window_size_right=None):
    """aten._flash_attention_backward's contract: the probabilities recomputed from the lse it is given, and the
    softmax gradient through rowsum(grad_out * out)."""
    probs = torch.exp(stand_in_scores(q, k, cu_q, scale, window_size_left) - lse[..., None].to(q.dtype))
    groups = q.shape[1] // k.shape[1]
    dv = torch.einsum("hts,thd->shd", probs, grad_out).unflatten(1, (k.shape[1], groups)).sum(2)
    dp = torch.einsum("thd,shd->hts", grad_out, repeat_heads(v, q))
    ds = probs * (dp - (grad_out * out).sum(-1).T[..., None])
    dq = torch.einsum("hts,shd->thd", ds, repeat_heads(k, q)) * scale
    dk = (torch.einsum("hts,thd->shd", ds, q) * scale).unflatten(1, (k.shape[1], groups)).sum(2)
    return dq, dk, dv


def repeat_heads(x, q):
    return x.repeat_interleave(q.shape[1] // x.shape[1], dim=1)


def stand_in_scores(q, k, cu_seqlens, scale, window_size_left):
    positions = torch.arange(q.shape[0])
    window = window_size_left + 1 if window_size_left is not None else None
    keep = attention.attends(attention.sample_of_token(cu_seqlens, q.shape[0]), positions[:, None],
                             positions[None, :], window)
    scores = torch.einsum("thd,shd->hts", q, repeat_heads(k, q)) * scale
    return scores.masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize(("window", "with_sinks"), [(None, False), (4, False), (None, True), (4, True)])
def test_flash_path_windows_and_sinks_on_stand_in_kernels(monkeypatch, window, with_sinks):
    """FlashVarlenCausal's own arithmetic (the window's off-by-one, the sinks folded into the log-sum-exp and their
    gradient) against gpt-oss's eager attention, which has both."""
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", stand_in_flash_forward)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", stand_in_flash_backward)
    q, k, v, cu_seqlens = packed_inputs()
    sinks = torch.randn(HEADS, dtype=torch.float64, requires_grad=True)
    scale = DIM ** -0.5
    packed = attention.FlashVarlenCausal.apply(
        *(x.squeeze(0).transpose(0, 1) for x in (q, k, v)), cu_seqlens, max(LENGTHS), scale, window, 0.0,
        sinks if with_sinks else None)[None]
    module = fake_module(sinks=sinks if with_sinks else torch.full((HEADS,), -torch.inf, dtype=torch.float64))
    reference = eager_per_sample(gpt_oss_eager, module, q, k, v, cu_seqlens, window, scaling=scale)
    # fp32 tolerances: like the kernel's, the log-sum-exp is fp32
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(reference)
    inputs = [q, k, v, sinks] if with_sinks else [q, k, v]
    for a, b in zip(torch.autograd.grad(packed, inputs, grad), torch.autograd.grad(reference, inputs, grad),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 4])
def test_flex_softcap_path_forward_on_cpu(window):
    """The block mask from cu_seqlens and the window, the padding to the micro-batch budget, and the softcap
    score_mod, against Gemma 2's eager attention."""
    q, k, v, cu_seqlens = (x.detach().float() if x.is_floating_point() else x for x in packed_inputs())
    softcap, scale = 0.5, 0.3
    with torch.no_grad():
        packed = attention.flex_softcap_attention(q, k, v, cu_seqlens, window, softcap, scale, length=200,
                                                  block_masks={})
        reference = eager_per_sample(gemma2_eager, fake_module(), q, k, v, cu_seqlens, window, scaling=scale,
                                     softcap=softcap)
        no_softcap = eager_per_sample(gemma2_eager, fake_module(), q, k, v, cu_seqlens, window, scaling=scale)
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)
    assert (no_softcap - reference).abs().max() > 1e-2  # the softcap matters at these scores


def test_what_packed_attention_lacks_is_refused_by_name():
    q, k, v, cu_seqlens = packed_inputs()
    kwargs = {"cu_seq_lens_q": cu_seqlens, "max_length_q": max(LENGTHS)}
    with pytest.raises(NotImplementedError, match="attention_chunk_size"):
        attention.packed_attention_forward(fake_module(), q, k, v, None, attention_chunk_size=8, **kwargs)
    with pytest.raises(NotImplementedError, match="non-causal attention"):
        attention.packed_attention_forward(fake_module(is_causal=False), q, k, v, None, **kwargs)
    out, _ = attention.packed_attention_forward(fake_module(), q, k, v, None, use_cache=False, **kwargs)
    assert out.shape == (1, sum(LENGTHS), HEADS, DIM)
