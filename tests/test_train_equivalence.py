"""The trainer's math against a plain reference loop: packing, micro-batches and ranks change nothing."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_train, write_tokenized_samples
from transformers import AutoModelForCausalLM

from data import TokenizedData, pack_micro_batch
from tiny_model import build_tiny_model, save_tiny_model

LEARNING_RATE = 1e-3


def per_sample_losses_separately(model, samples):
    """CE sum of each sample run alone, the textbook way: logits[:-1] predict labels[1:]."""
    losses = []
    for input_ids, labels in samples:
        logits = model(torch.tensor([input_ids])).logits[0]
        losses.append(F.cross_entropy(logits[:-1].float(), torch.tensor(labels[1:]), reduction="sum"))
    return losses


def per_sample_losses_packed(model, samples, position_ids=None):
    """CE sum of each sample, computed from one packed row with the trainer's packing."""
    data = TokenizedData(
        input_ids=np.concatenate([s[0] for s in samples]).astype(np.int32),
        labels=np.concatenate([s[1] for s in samples]).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum([len(s[0]) for s in samples])]),
        num_loss_tokens=np.array([sum(t != -100 for t in s[1][1:]) for s in samples]),
    )
    batch = pack_micro_batch(data, list(range(len(samples))), torch.device("cpu"))
    logits = model(batch.input_ids, position_ids=batch.position_ids if position_ids is None else position_ids,
                   use_cache=False).logits[0]
    token_losses = torch.zeros(batch.num_tokens)
    token_losses[batch.loss_positions] = F.cross_entropy(logits[batch.loss_positions].float(), batch.loss_targets,
                                                         reduction="none")
    bounds = np.cumsum([0] + [len(s[0]) for s in samples])
    return [token_losses[start:end].sum() for start, end in zip(bounds[:-1], bounds[1:], strict=True)], batch


def make_samples(vocab_size, lengths=(7, 12, 5, 9), seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for length in lengths:
        ids = rng.integers(3, vocab_size, size=length).tolist()
        labels = ids.copy()  # every token trained, the worst case for a shift across the boundary
        samples.append((ids, labels))
    return samples


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama", "mistral", "gemma"])
def test_packed_equals_separate(arch):
    model = build_tiny_model(vocab_size=300, arch=arch, seed=1)
    model.config._attn_implementation = "sdpa"
    samples = make_samples(300)
    separate = per_sample_losses_separately(model, samples)
    packed, _ = per_sample_losses_packed(model, samples)
    for a, b in zip(packed, separate, strict=True):
        assert torch.allclose(a, b, rtol=1e-5), (a, b)
    grads_separate = torch.autograd.grad(sum(separate), list(model.parameters()))
    grads_packed = torch.autograd.grad(sum(packed), list(model.parameters()))
    for a, b in zip(grads_packed, grads_separate, strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-8


def test_packed_samples_attending_to_each_other_would_be_caught():
    """The check above can fail: one position sequence over the whole row lets samples see each other."""
    model = build_tiny_model(vocab_size=300, seed=1)
    model.config._attn_implementation = "sdpa"
    samples = make_samples(300)
    separate = per_sample_losses_separately(model, samples)
    total = sum(len(s[0]) for s in samples)
    leaky, _ = per_sample_losses_packed(model, samples, position_ids=torch.arange(total)[None])
    assert not torch.allclose(leaky[1], separate[1], rtol=1e-3)


def reference_step(model_dir, data_path, max_grad_norm=1.0):
    """One AdamW step the plain way: no packing, no FSDP, summed CE over the loss-token count."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    samples = [json.loads(line) for line in open(data_path)]
    samples = [(s["input_ids"], s["labels"]) for s in samples]
    num_loss_tokens = sum(sum(t != -100 for t in labels[1:]) for _, labels in samples)
    losses = per_sample_losses_separately(model, samples)
    loss = sum(losses) / num_loss_tokens
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    optimizer.step()
    return loss.item(), grad_norm.item(), model


@pytest.fixture(scope="module")
def equivalence_data(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("data") / "tokenized.jsonl"
    return write_tokenized_samples(path, tiny_tokenizer, num_samples=16)


def one_step(tmp_path, name, model_dir, data_path, nproc, max_tokens_per_gpu, extra=()):
    output_dir = tmp_path / name
    run_train(["--data-path", str(data_path), "--model-name-or-path", str(model_dir), "--output-dir", str(output_dir),
               "--batch-size", "16", "--max-steps", "1", "--num-warmup-steps", "0",
               "--learning-rate", str(LEARNING_RATE), "--max-tokens-per-gpu", str(max_tokens_per_gpu),
               "--seed", "3", *extra], nproc=nproc)
    metrics = [json.loads(line) for line in open(output_dir / "training_metrics.jsonl")]
    assert len(metrics) == 1
    model = AutoModelForCausalLM.from_pretrained(output_dir / "hf_format" / "samples_16", dtype=torch.float32)
    return metrics[0], model


def assert_same_weights(model_a, model_b, model_before, rtol=1e-3):
    """Each parameter's update agrees within rtol of its size. Updates, not weights, are compared, and not element by
    element: Adam's first step is about lr * sign(grad), so a gradient that is zero up to rounding (k_proj's bias,
    the embeddings of unseen tokens) becomes a full-size step in a direction set by the rounding."""
    params_b, params_before = dict(model_b.named_parameters()), dict(model_before.named_parameters())
    for name, a in model_a.named_parameters():
        update_b = params_b[name] - params_before[name]
        assert (a - params_b[name]).norm() <= rtol * update_b.norm() + 1e-9, name


def test_every_split_gives_the_same_step(tmp_path, tiny_model_dir, equivalence_data):
    ref_loss, ref_grad_norm, ref_model = reference_step(tiny_model_dir, equivalence_data)
    model_before = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    runs = {
        "ws1_one_micro_batch": one_step(tmp_path, "a", tiny_model_dir, equivalence_data, 1, 4096),
        "ws1_many_micro_batches": one_step(tmp_path, "b", tiny_model_dir, equivalence_data, 1, 48),
        "ws2": one_step(tmp_path, "c", tiny_model_dir, equivalence_data, 2, 64),
        "ws2_shard_grad_op": one_step(tmp_path, "d", tiny_model_dir, equivalence_data, 2, 64,
                                      ["--fsdp-sharding-strategy", "SHARD_GRAD_OP"]),
        "ws2_no_shard": one_step(tmp_path, "e", tiny_model_dir, equivalence_data, 2, 64,
                                 ["--fsdp-sharding-strategy", "NO_SHARD"]),
    }
    assert runs["ws1_one_micro_batch"][0]["micro_batches"] == 1
    assert runs["ws1_many_micro_batches"][0]["micro_batches"] > 3
    for name, (metrics, model) in runs.items():
        assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5), name
        assert metrics["grad_norm"] == pytest.approx(ref_grad_norm, rel=1e-5), name
        assert metrics["num_samples"] == 16
        assert_same_weights(model, ref_model, model_before)
    # The checkpoint is the trained model: same logits as the reference after its step.
    sample = torch.tensor([json.loads(open(equivalence_data).readline())["input_ids"]])
    torch.testing.assert_close(runs["ws2"][1](sample).logits, ref_model(sample).logits, rtol=1e-4, atol=1e-5)


def test_two_simulated_nodes_hybrid_shard_matches_full_shard(tmp_path, tiny_model_dir, equivalence_data):
    """torchrun --nnodes=2 on localhost: HYBRID_SHARD replicates across the nodes and shards within each."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    from distributed import free_port

    port = free_port()
    output_dir = tmp_path / "hybrid"
    args = ["--data-path", str(equivalence_data), "--model-name-or-path", str(tiny_model_dir),
            "--output-dir", str(output_dir), "--batch-size", "16", "--max-steps", "1", "--num-warmup-steps", "0",
            "--learning-rate", str(LEARNING_RATE), "--max-tokens-per-gpu", "64", "--seed", "3",
            "--fsdp-sharding-strategy", "HYBRID_SHARD"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                          "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}",
                          str(REPO_ROOT / "train.py"), *args], env=env, cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    hybrid = json.loads(open(output_dir / "training_metrics.jsonl").readline())
    full_metrics, full_model = one_step(tmp_path, "full", tiny_model_dir, equivalence_data, 4, 64)
    assert hybrid["loss"] == pytest.approx(full_metrics["loss"], rel=1e-5)
    assert hybrid["grad_norm"] == pytest.approx(full_metrics["grad_norm"], rel=1e-5)
    hybrid_model = AutoModelForCausalLM.from_pretrained(output_dir / "hf_format" / "samples_16", dtype=torch.float32)
    model_before = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert_same_weights(hybrid_model, full_model, model_before)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe"])
def test_empty_micro_batch_with_an_untied_head_on_two_ranks(tmp_path, equivalence_data, arch):
    """--batch-size 1 on 2 ranks: each step, one rank packs no sample. Its untied LM head (and in an MoE, its experts)
    sees no loss token, yet its gradient must take part in the reduce-scatter like on the other rank, which would
    otherwise abort (gloo) or hang (NCCL). The losses are those of 1 rank."""
    model_dir = save_tiny_model(tmp_path / "model", arch=arch, tie_word_embeddings=False)
    runs = {}
    for nproc in (1, 2):
        output_dir = tmp_path / f"ws{nproc}"
        run_train(["--data-path", str(equivalence_data), "--model-name-or-path", str(model_dir), "--output-dir",
                   str(output_dir), "--batch-size", "1", "--max-steps", "3", "--num-warmup-steps", "0",
                   "--learning-rate", str(LEARNING_RATE), "--max-tokens-per-gpu", "4096", "--seed", "3"], nproc=nproc)
        metrics = [json.loads(line) for line in open(output_dir / "training_metrics.jsonl")]
        model = AutoModelForCausalLM.from_pretrained(output_dir / "hf_format" / "samples_3", dtype=torch.float32)
        runs[nproc] = metrics, model
    (metrics_1, model_1), (metrics_2, model_2) = runs[1], runs[2]
    assert [m["step"] for m in metrics_2] == [1, 2, 3]
    for one, two in zip(metrics_1, metrics_2, strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert model_1.lm_head.weight is not model_1.model.embed_tokens.weight
    assert_same_weights(model_2, model_1, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
