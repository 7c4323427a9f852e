"""ftjax's built-in methods: one module each, registered in `ftjax.peft.registry`.

    >>> import jax
    >>> method = build_method({"name": "lora", "rank": 8, "alpha": 16, "targets": "qv"})
    >>> adapted = method.apply(params, jax.random.key(0))
    >>> trainable, frozen = method.split(adapted)
    >>> trainable["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    LoraWeight(w=None, a=float32[32, 8], b=float32[8, 32], scale=2.0, dropout=0.0,
               compute='auto', init=None, freeze_a=False)

(`params`: a tiny Llama's params, set up by tests/test_doctests.py.)

- `full`: everything trains.
- `galore`: everything trains, with Adam's moments of the targeted kernels in
  a rank-r projection of their gradients (rank, update_proj_gap, scale, targets).
- `lora`: rank, alpha, rslora (scale alpha/sqrt(r) instead of alpha/r), dropout,
  init (`kaiming` | `gaussian` | `pissa`), targets (see `ftjax.peft.targets`),
  compute (`auto` | `factored` | `merged` | `hybrid`, see `ftjax.peft.lora`),
  dtype (adapter dtype; default the kernel's). Study preset `pissa`.
- `dora`: the same options; a DoRA leaf per target.
- `qlora`: the same, plus quantize (targets whose base becomes NF4, default
  `all-linear`) and double_quant. Targets default to `all-linear` as in QLoRA.
  LoRA+ (`loraplus_ratio`: b's learning rate / a's) and LoRA-FA (`fa`: a frozen)
  are options of all three.
- `ia3`: (IA)^3's per-feature scales of keys, values and the MLP's down
  projection (targets, feedforward_targets, dtype; see `ftjax.peft.methods.ia3`).
- `vera`: VeRA's shared frozen random projections with trainable per-layer
  vectors lambda_d (r) and lambda_b (out) (rank, d_initial, targets, dtype).
- `loha`: low-rank Hadamard-product updates (rank, alpha, targets, dtype).
- `lokr`: Kronecker-product updates with PEFT's factorization (rank, alpha,
  decompose_both, decompose_factor, targets, dtype).
- `oft`: a block-diagonal orthogonal rotation (Cayley transform of trainable
  skew-symmetric blocks) of each kernel's input side (block_size or rank,
  block_share, cayley_neumann, neumann_terms, coft, eps, targets, dtype).
- `adalora`: SVD-form updates whose ranks an importance-driven allocator prunes
  from init_r to target_r on average (schedule options as PEFT's AdaLoraConfig).
- `prompt_tuning`: trainable virtual-token embeddings before every sequence
  (num_virtual_tokens, init `random` | `vocab` | `text`, init_text, tokenizer).
- `prefix_tuning`: trainable per-layer keys and values every query attends to
  first (num_virtual_tokens, prefix_projection, encoder_hidden_size, init).
- `bitfit`: the biases train (and the norm scales, in a model without biases).
- `freeze`: only the parameters matching the regex `trainable` train, and/or
  those of the last `last_layers` decoder layers (unscanned params only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ftjax.peft.methods import (  # noqa: F401  (registers)
    adalora,
    bitfit,
    dora,
    freeze,
    full,
    galore,
    ia3,
    loha,
    lokr,
    lora,
    oft,
    prefix_tuning,
    prompt_tuning,
    qlora,
    vera,
)
from ftjax.peft.registry import Method, build_method, get, known_methods, resolve_config
from ftjax.peft.tree import replace_leaves

__all__ = [
    "DEFAULTS",
    "Method",
    "build_method",
    "known_methods",
    "replace_leaves",
    "resolve_config",
]


class _Defaults(Mapping):
    """name -> default options of every registered method (a read-only view)."""

    def __getitem__(self, name):
        return get(name).defaults()

    def __iter__(self):
        return iter(known_methods())

    def __len__(self):
        return len(known_methods())


DEFAULTS: Mapping[str, dict[str, Any]] = _Defaults()
