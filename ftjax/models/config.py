"""ModelConfig: the one hashable description every model family is built from.

It is a frozen dataclass so that it can be a `flax.linen` module attribute and a
static argument of jitted functions. Family-specific fields are simply unused by
the other families; each family's spec (`ftjax.models.registry.FamilySpec`)
translates to and from Hugging Face `config.json`, and its `model_type` must be
a registered one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ftjax.errors import ModelError
from ftjax.models import registry
from ftjax.models.layers import ACTIVATIONS

ATTENTION_KERNELS = ("auto", "block", "xla", "splash", "cudnn")  # attention.KERNELS
# What the backward pass keeps of each layer (`decoder.remat_policy`): "none"
# keeps every activation; "full" only the layer's input (everything inside is
# recomputed); "dots" also the matmul outputs; "attention" also the attention
# output, so the attention kernel is not rerun; "offload" keeps the attention
# output and the MLP hidden activations in host memory (TPU/GPU);
# "full_offload" is "full" with each layer's input (the residual stream the
# backward pass keeps, layers x batch x seq x hidden) in host memory.
REMAT_POLICIES = ("none", "full", "dots", "attention", "offload", "full_offload")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    # Llama family.
    rope_theta: float = 10000.0
    # Hashable form of HF's rope_scaling dict: tuple of (key, value) pairs, or None.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    attention_bias: bool = False  # bias on q/k/v (Qwen2 sets it) ...
    o_proj_bias: bool = False  # ... and on the output projection (Llama's attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys
    sliding_window: int | None = None  # Mistral
    # Encoder families (BERT, RoBERTa).
    type_vocab_size: int = 0  # token-type (segment A/B) embeddings; 0: none
    pad_token_id: int = 0  # RoBERTa numbers positions from pad_token_id + 1
    hidden_dropout: float = 0.0  # HF hidden_dropout_prob: embeddings, sublayer outputs
    attention_dropout: float = 0.0  # HF attention_probs_dropout_prob
    classifier_dropout: float | None = None  # None: hidden_dropout, as HF does
    # What the model outputs (the family's `FamilySpec.tasks`): "" is the
    # family's own (next-token logits for decoders, hidden states for a bare
    # encoder); "sequence_classification" gives (batch, 1, num_labels) logits
    # from the first token, "token_classification" (batch, seq, num_labels).
    # num_labels == 1 with sequence classification is regression (MSE), as in HF.
    task: str = ""
    num_labels: int = 0
    # Execution options (not part of the checkpoint).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"  # REMAT_POLICIES; True / False are read as "full" / "none"
    # Attention kernel (`attention.dot_product_attention`): "auto" picks by the
    # target platform (TPU splash, GPU cuDNN, CPU the causal block kernel for
    # long training sequences); "xla" always computes the whole score matrix
    # through jax.nn.dot_product_attention; "block", "splash", "cudnn" ask for one.
    attention: str = "auto"

    def __post_init__(self):
        family = registry.get_family(self.model_type)
        if isinstance(self.remat, bool):  # the older boolean form
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ModelError(f"remat={self.remat!r}; expected one of {', '.join(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_KERNELS:
            raise ModelError(
                f"attention={self.attention!r}; expected one of {', '.join(ATTENTION_KERNELS)}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ModelError(
                f"hidden_act={self.hidden_act!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.scan_layers and not family.scannable:
            raise ModelError(
                f"scan_layers=True: model_type {self.model_type!r} runs its layers unscanned only"
            )
        if self.task not in ("",) + family.tasks:
            known = ", ".join(repr(t) for t in ("",) + family.tasks)
            raise ModelError(f"task={self.task!r}: model_type {self.model_type!r} supports {known}")
        if self.task and self.num_labels < 1:
            raise ModelError(f"task={self.task!r} needs num_labels >= 1, got {self.num_labels}")
        if family.check is not None:
            family.check(self)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def is_regression(self) -> bool:
        """Sequence regression (HF's num_labels == 1): an MSE loss on one float."""
        return self.task == "sequence_classification" and self.num_labels == 1

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def freeze_rope_scaling(rope_scaling: dict | None) -> tuple | None:
    """Turns HF's rope_scaling dict into the hashable tuple ModelConfig stores."""
    if not rope_scaling:
        return None
    return tuple(sorted((k, v) for k, v in rope_scaling.items() if not isinstance(v, (list, dict))))
