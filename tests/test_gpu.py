"""GPU-only checks of the kernels CI cannot run: torch varlen attention and Liger's fused loss.

Skipped without CUDA. Run on a GPU machine with `python -m pytest -q tests/test_gpu.py`.
"""

import numpy as np
import pytest
import torch

from data import TokenizedData, pack_micro_batch
from model import (
    CausalLMWithSummedLoss,
    LinearCrossEntropySum,
    choose_attn_implementation,
    chunked_cross_entropy_sum,
)
from tiny_model import build_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def packed_data(samples):
    return TokenizedData(
        input_ids=np.concatenate([s for s in samples]).astype(np.int32),
        labels=np.concatenate([s for s in samples]).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum([len(s) for s in samples])]),
        num_loss_tokens=np.array([len(s) - 1 for s in samples]),
    )


def decoder_output(model, batch):
    decoder = getattr(model, model.base_model_prefix)
    return decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                   cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                   max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen).last_hidden_state[0].float()


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma"])
def test_varlen_packed_equals_separate_sdpa(arch):
    """Packed micro-batch through varlen attention == each sample alone through sdpa, in bf16."""
    device = torch.device("cuda")
    choose_attn_implementation(None, device)
    rng = np.random.default_rng(0)
    samples = [rng.integers(3, 300, n) for n in (37, 101, 5, 64)]
    model = build_tiny_model(300, arch=arch, seed=0).to(device, torch.bfloat16)
    wrapper = CausalLMWithSummedLoss(model, use_liger=False)
    data = packed_data(samples)
    batch = pack_micro_batch(data, list(range(len(samples))), device)

    model.config._attn_implementation = "sdpa"
    separate_batches = [pack_micro_batch(packed_data([s]), [0], device) for s in samples]
    separate_hidden = torch.cat([decoder_output(model, b) for b in separate_batches])
    separate_loss = sum(wrapper(b) for b in separate_batches)
    model.config._attn_implementation = "varlen"
    packed_hidden = decoder_output(model, batch)
    packed_loss = wrapper(batch)
    packed_loss.backward()
    error = relative_error(packed_hidden, separate_hidden)
    assert error < 2e-2
    torch.testing.assert_close(packed_loss.float(), separate_loss.float(), rtol=2e-2, atol=1e-2)

    # The check can fail: one sequence over the whole row lets samples attend to each other.
    total = batch.num_tokens
    batch.cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=device)
    batch.max_seqlen = total
    leaky_error = relative_error(decoder_output(model, batch), separate_hidden)
    assert leaky_error > 5 * error, (leaky_error, error)


def test_liger_fused_loss_equals_chunked_loss():
    device = torch.device("cuda")
    torch.manual_seed(0)
    hidden = torch.randn(3000, 64, device=device, requires_grad=True)
    weight = torch.randn(5000, 64, device=device, requires_grad=True)
    targets = torch.randint(0, 5000, (3000,), device=device)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets)
    liger_grads = torch.autograd.grad(liger, [hidden, weight])
    chunked = chunked_cross_entropy_sum(hidden, weight, targets, softcap=None, chunk_size=1024)
    chunked_grads = torch.autograd.grad(chunked, [hidden, weight])
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(liger, reference, rtol=1e-4, atol=1e-3)
    for a, b in zip(liger_grads, chunked_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("softcap", "chunk_mem_const"), [(None, 64), (None, 1), (30.0, 4)])
def test_linear_cross_entropy_sum_equals_reference(softcap, chunk_mem_const):
    """The loss train.py uses with Liger (no read-back to the host) against fp32 torch, in one or many chunks."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    hidden = torch.randn(3000, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(5000, 64, device=device) * 0.3).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 5000, (3000,), device=device)
    loss = LinearCrossEntropySum.apply(hidden, weight, targets, softcap, chunk_mem_const)
    grads = torch.autograd.grad(loss * 0.5, [hidden, weight])
    logits = hidden.float() @ weight.float().T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    reference_grads = torch.autograd.grad(reference * 0.5, [hidden, weight])
    torch.testing.assert_close(loss, reference, rtol=2e-3, atol=1e-2)
    for a, b in zip(grads, reference_grads, strict=True):
        assert a.dtype == torch.bfloat16
        assert relative_error(a.float(), b.float()) < 2e-2
