"""Builds a tiny random causal LM and a tiny byte-level BPE tokenizer offline, in seconds.

The demo and the tests use these instead of hub downloads. The tokenizer has a ChatML template
(Qwen2.5-style, with a default system prompt) and no `{% generation %}` markers, like real ones.

    python tiny_model.py --output-dir demo_output/tiny-model --arch qwen2
"""

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a tiny helpful assistant.<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for tool_call in message['tool_calls'] %}"
    "{%- set call = tool_call.function if tool_call.function is defined else tool_call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' + (call.arguments | tojson)"
    " + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A little English so that BPE learns real merges (tokens that span several characters).
TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. A helpful assistant answers questions clearly.
What is the capital of France? The capital of France is Paris. How many legs does a spider have?
A spider has eight legs. Please write a short poem about the sea. Waves roll in and out again.
Translate hello into Spanish: hola. What is two plus two? Two plus two is four.
system user assistant tool You are a tiny helpful assistant. get_weather city London sunny
{"name": "get_weather", "arguments": {"city": "Paris"}} <tool_call> </tool_call> 0123456789
"""


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


# Each family with what sets it apart switched on and small enough to matter in samples of 5 to 12 tokens: sliding
# windows of 4 tokens, attention and final-logit softcaps, sinks, logit scales, biased heads, routed experts.
WINDOW = dict(sliding_window=4)
MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.02)
TINY_CONFIGS = {
    "qwen2": dict(model_type="qwen2"),
    "qwen2_sliding": dict(model_type="qwen2", use_sliding_window=True, max_window_layers=1, **WINDOW),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "qwen3_sliding": dict(model_type="qwen3", head_dim=16, use_sliding_window=True, max_window_layers=1, **WINDOW),
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=16, num_experts=4, moe_intermediate_size=32, **MOE),
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral"),
    "mistral_sliding": dict(model_type="mistral", **WINDOW),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, **WINDOW, **MOE),
    "gemma": dict(model_type="gemma", head_dim=16),
    # Weights 5x the usual init, else attention scores are far too small for the softcap to change anything.
    "gemma2": dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=1.0,
                   final_logit_softcapping=2.0, initializer_range=0.1, **WINDOW),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=2.0,
                        layer_types=["sliding_attention", "full_attention"], **WINDOW),
    "phi": dict(model_type="phi"),
    "phi3": dict(model_type="phi3", pad_token_id=0),
    "cohere": dict(model_type="cohere", logit_scale=0.25),
    "granite": dict(model_type="granite", logits_scaling=4.0, attention_multiplier=0.2, embedding_multiplier=2.0,
                    residual_multiplier=0.5),
    "olmo2": dict(model_type="olmo2"),
    "smollm3": dict(model_type="smollm3", pad_token_id=0),
    "gpt_oss": dict(model_type="gpt_oss", head_dim=16, num_local_experts=4,
                    layer_types=["sliding_attention", "full_attention"], **WINDOW, **MOE),
}


def build_tiny_model(vocab_size: int, arch: str = "qwen2", seed: int = 0, tie_word_embeddings: bool | None = True):
    """A 2-layer random model of the given architecture, small enough to train on a CPU in seconds.
    `tie_word_embeddings=None` keeps the family's own default."""
    import torch

    tie = {} if tie_word_embeddings is None else {"tie_word_embeddings": tie_word_embeddings}
    config = AutoConfig.for_model(
        **TINY_CONFIGS[arch],
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        **tie,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:  # initialized to zeros, which would hide a loss that forgets it
        torch.nn.init.normal_(head.bias, std=1.0)
    return model


def save_tiny_model(output_dir: str | Path, arch: str = "qwen2", tie_word_embeddings: bool | None = True) -> Path:
    """Writes tokenizer and model into `output_dir`, loadable with from_pretrained."""
    output_dir = Path(output_dir)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), arch=arch, tie_word_embeddings=tie_word_embeddings)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(output_dir)
    model.save_pretrained(output_dir)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="Folder to write the tokenizer and model to.")
    parser.add_argument("--arch", default="qwen2", choices=sorted(TINY_CONFIGS), help="Model architecture.")
    args = parser.parse_args()
    print(f"tiny {args.arch} model and tokenizer written to {save_tiny_model(args.output_dir, args.arch)}")


if __name__ == "__main__":
    main()
