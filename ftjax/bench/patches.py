"""Changes to other modules tried inside the benchmark (`PATCHES`), and the
named variants of an ftjax job (`VARIANTS`) that time them beside the base."""

from __future__ import annotations

# Prototypes of changes to other modules, applied inside a worker before the
# model is built, so that their gain is measured against the unpatched code in
# the same run (as variants, below). Each is a function of no arguments.


def _attention_einsum():
    """Grouped-query attention as two einsums around a float32 softmax, the scale
    folded into q (t*h multiplies instead of t*s), in place of
    `jax.nn.dot_product_attention`'s XLA path."""
    import jax
    import jax.numpy as jnp

    from ftjax.models import layers

    def attention(q, k, v, mask, scale=None, causal=False):
        del causal
        b, t, n, h = q.shape
        groups = n // k.shape[2]
        scale = h**-0.5 if scale is None else scale
        q = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, k.shape[2], groups, h)
        s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
        s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(b, t, n, h)

    layers.dot_product_attention = attention


def _attention_dense():
    """The whole score matrix through `jax.nn.dot_product_attention`, as before
    `layers.causal_block_attention` (the A/B of that change)."""
    import jax

    from ftjax.models import layers

    def attention(q, k, v, mask, scale=None, causal=False):
        del causal
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)

    layers.dot_product_attention = attention


def _qlora_remat():
    """Dequantize an NF4 kernel again in the backward pass rather than keep it:
    without this, XLA saves every layer's dequantized float kernel from the
    forward for `dx = dy @ W.T`, so QLoRA's peak holds a float copy of the whole
    model. `dots_saveable` keeps the matmul output, so only the (elementwise)
    dequantization is recomputed."""
    import jax
    import jax.numpy as jnp

    from ftjax.peft import quant

    def apply_linear(self, x, *, dtype, rng):
        del rng
        matmul = lambda leaf, x: jnp.matmul(x, leaf.materialize(dtype))
        policy = jax.checkpoint_policies.dots_saveable
        return jax.checkpoint(matmul, policy=policy)(self, x)

    quant.NF4Weight.apply_linear = apply_linear


def _grad_barrier():
    """An optimization barrier on the gradient arriving at every projection's
    output. XLA:CPU runs the weight-gradient dots (contracting over tokens) on
    Eigen with the output gradient transposed, and fuses that transpose into the
    gradient's producer (the SiLU backward, say), whose seven-input fusion then
    writes column-wise and becomes the slowest elementwise op of the step. Behind
    the barrier the transpose is a separate, cheap copy."""
    import jax

    from ftjax.models import layers

    @jax.custom_vjp
    def barrier(y):
        return y

    barrier.defvjp(lambda y: (y, None), lambda _, g: (jax.lax.optimization_barrier(g),))
    linear = layers.linear

    def patched(x, kernel, bias=None, *, dtype=None, rng=None):
        return barrier(linear(x, kernel, bias, dtype=dtype, rng=rng))

    layers.linear = patched


def _lora_materialize():
    """An optimization barrier on a LoRA projection's output `x@w + s*(x@a)@b`.
    Without it XLA never writes the sum: every consumer recomputes it from the
    two matmul outputs, and the backward's transposing SiLU-gradient fusion then
    reads six (T, out) arrays column-wise instead of three, the slowest op of a
    LoRA step on CPU. (DoRA's `gain * (...)` materializes its sum, and is faster.)"""
    import jax

    from ftjax.peft.lora import LoraWeight

    apply_linear = LoraWeight.apply_linear

    def patched(self, x, *, dtype, rng):
        return jax.lax.optimization_barrier(apply_linear(self, x, dtype=dtype, rng=rng))

    LoraWeight.apply_linear = patched


PATCHES: dict = {
    "lora_materialize": _lora_materialize,
    "attention_einsum": _attention_einsum,
    "attention_dense": _attention_dense,
    "qlora_remat": _qlora_remat,
    "grad_barrier": _grad_barrier,
}

# Named variants of an ftjax job: XLA flags (a user-level setting), model config
# fields, method options, or patches. `--variants=lora@ynn_off` runs LoRA both ways, interleaved.
VARIANTS: dict = {
    "ynn_off": {"xla_flags": "--xla_cpu_experimental_ynn_fusion_type="},  # Eigen dots
    "ynn_all": {
        "xla_flags": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,individual_dot"
    },
    "onednn": {"xla_flags": "--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type="},
    "scan": {"model": {"scan_layers": True}},
    "hybrid": {"method": {"compute": "hybrid"}},  # LoRA: merged forward, factored grads
    "remat": {"model": {"remat": True}},
    "attention_einsum": {"patches": ["attention_einsum"]},
    "attention_dense": {"patches": ["attention_dense"]},
    "qlora_remat": {"patches": ["qlora_remat"]},
    "grad_barrier": {"patches": ["grad_barrier"]},
    "lora_materialize": {"patches": ["lora_materialize"]},
}


def apply_patches(names) -> None:
    for name in names:
        if name not in PATCHES:
            raise ValueError(f"patches: unknown {name!r}; known: {', '.join(PATCHES) or '(none)'}")
        PATCHES[name]()
