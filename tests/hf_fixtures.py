"""Tiny random Hugging Face models built and saved locally (no download).

`save_tiny(family, tmp_path)` returns the directory of a checkpoint written
with `transformers`' own `save_pretrained`, so loading it goes through exactly
the path a downloaded checkpoint takes."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 97

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attn_implementation="eager",
)

TINY_CONFIGS = {
    "llama2": lambda: transformers.LlamaConfig(**{**_COMMON, "num_key_value_heads": 4}),
    "llama3": lambda: transformers.LlamaConfig(
        **_COMMON,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama_tied": lambda: transformers.LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=16),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        attn_implementation="eager",
    ),
}


def build_tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[family]())
    # Random (not zero) biases and norm scales, so the parity checks exercise them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_tiny(family: str, out_dir, seed: int = 0) -> str:
    model = build_tiny(family, seed)
    model.save_pretrained(str(out_dir))
    return str(out_dir)


def torch_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None):
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask)
        out = model(torch.tensor(input_ids), **kwargs)
    return out.logits.float().numpy()
