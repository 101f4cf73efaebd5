"""model.py on CPU: --activation-checkpointing auto/on/off, the sharded gradient clip, the FLOPs count."""

import pytest
import torch
from transformers import AutoConfig

import model as model_module
import train
from distributed import Dist

ARGS = ["--data-path", "x", "--model-name-or-path", "y", "--output-dir", "z"]


@pytest.mark.parametrize(("flags", "expected"), [
    ([], "auto"), (["--activation-checkpointing"], "on"), (["--activation-checkpointing", "off"], "off"),
    (["--no-activation-checkpointing"], "off"), (["--activation-checkpointing", "on"], "on"),
])
def test_activation_checkpointing_flag(flags, expected):
    assert train.parse_args(ARGS + flags).activation_checkpointing == expected


def test_auto_checkpointing_is_off_on_cpu_and_explicit_choices_win():
    config = train.parse_args(ARGS)
    model_config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    d = Dist(0, 0, 1, 1, torch.device("cpu"))
    use, why = model_module.choose_activation_checkpointing(
        config.activation_checkpointing, config.fsdp_sharding_strategy, config.max_tokens_per_gpu, model_config,
        10**6, d)
    assert not use and "not on a GPU" in why
    assert model_module.choose_activation_checkpointing("on", "FULL_SHARD", 4096, model_config, 10**6, d)[0]


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    (model(torch.randn(16, 8)) ** 2).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        q.grad = p.grad.clone()
    norm = model_module.clip_grad_norm(model, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_flops_count():
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen2", vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1)
    # q,o: 8x8 each; k,v: 8x4 each; mlp 3 x 8x16; head 8x100
    per_layer = 64 + 64 + 32 + 32 + 3 * 128
    assert model_module.matmul_params(config) == 2 * per_layer + 800
    import numpy as np

    lengths = np.array([3, 5])
    assert model_module.step_flops(config, lengths) == 6 * (2 * per_layer + 800) * 8 + 6 * 2 * 8 * (9 + 25)
