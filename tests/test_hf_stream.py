"""The streamed Hugging Face save against save_pretrained: same tensors, same names, tied weights kept tied."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_stream
from tiny_model import build_tiny_model


def stream_save(model, directory, dtype, max_shard_bytes=hf_stream.MAX_SHARD_BYTES):
    tensors = hf_stream.saved_tensors(model)
    directory.mkdir()
    hf_stream.write_weights(directory, tensors, dtype, hf_stream.gathered(tensors, dtype, on_this_rank=True),
                            max_shard_bytes)
    model.config.save_pretrained(directory)


def all_weights(directory):
    weights = {}
    for file in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


@pytest.mark.parametrize(("arch", "tied"), [("qwen2", True), ("qwen2", False), ("gemma", True), ("llama", False)])
def test_streamed_weights_equal_save_pretrained(tmp_path, arch, tied):
    model = build_tiny_model(300, arch=arch, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "reference")
    stream_save(model, tmp_path / "streamed", torch.float32)
    reference, streamed = all_weights(tmp_path / "reference"), all_weights(tmp_path / "streamed")
    assert set(streamed) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(streamed[name], tensor), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tied
    ids = torch.arange(20)[None]
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_many_shards_with_an_index_and_bf16(tmp_path):
    model = build_tiny_model(300, tie_word_embeddings=True)
    stream_save(model, tmp_path / "streamed", torch.bfloat16, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors"))
    assert len(files) > 3 and sorted(set(index["weight_map"].values())) == files
    weights = all_weights(tmp_path / "streamed")
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_shard_plan_keeps_order_and_bound():
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1, "e": 1}
    assert hf_stream.plan_shards(sizes, max_shard_bytes=8) == [["a", "b"], ["c"], ["d", "e"]]
    assert hf_stream.plan_shards(sizes, max_shard_bytes=100) == [["a", "b", "c", "d", "e"]]


def test_a_transformers_without_the_helpers_falls_back_to_save_pretrained(monkeypatch):
    """saved_tensors says "save it whole" (None) rather than raising, so every save does not fail."""
    model = build_tiny_model(300)
    assert hf_stream.saved_tensors(model) is not None
    monkeypatch.setitem(sys.modules, "transformers.core_model_loading", None)  # import raises
    assert hf_stream.saved_tensors(model) is None
