"""CPU checks of the performance options: --activation-checkpointing auto/on/off and the sharded gradient clip."""

import pytest
import torch
from transformers import AutoConfig

import train

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
    d = train.Dist(0, 0, 1, 1, torch.device("cpu"))
    use, why = train.choose_activation_checkpointing(config, model_config, 10**6, d)
    assert not use and "not on a GPU" in why
    config.activation_checkpointing = "on"
    assert train.choose_activation_checkpointing(config, model_config, 10**6, d)[0]


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    (model(torch.randn(16, 8)) ** 2).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        q.grad = p.grad.clone()
    norm = train.clip_grad_norm(model, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
