"""ftjax's NF4 against bitsandbytes itself (on CPU): the Flax kernel `(in, out)`
quantizes to the 4-bit codes and block constants that
`bitsandbytes.functional.quantize_4bit` gives for the PyTorch weight `W = kernel.T`,
double quantization takes the same 8-bit codes as bitsandbytes' reference
kernel, and bitsandbytes' own quantized state dequantizes in ftjax to
bitsandbytes' values bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import peft
from ftjax.peft import quant

torch = pytest.importorskip("torch")
bnb_f = pytest.importorskip("bitsandbytes.functional")

# bitsandbytes' reference ("default") kernels, which its CPU backend overrides
# for the 8-bit blockwise quantizer with a 65536-entry lookup table (see quant.py).
REFERENCE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
# (in, out) kernels: whole blocks per row of W, blocks across rows, a short last
# block, and more than one double-quantization group with a short last one.
SHAPES = [(128, 40), (96, 40), (50, 33), (1024, 300)]


def weight(shape, seed=0, dtype=np.float32):
    """A heavy-tailed PyTorch weight `(out, in)` for a kernel of `shape`."""
    w = np.random.default_rng(seed).standard_t(5, size=shape[::-1]).astype(np.float32)
    return w.astype(dtype)


def bnb_quantize(w, compress_statistics):
    return bnb_f.quantize_4bit(
        torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=compress_statistics
    )


def bnb_dequantize(packed, state, absmax=None):
    """bitsandbytes' dequantization through its reference 4-bit kernel (its
    0.50 CPU kernel mis-indexes blocks that span rows of W), optionally with
    other (float32) block constants."""
    if absmax is None:
        absmax = state.absmax
        if state.nested:
            absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    out = torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
        REFERENCE, packed, absmax, 64, "nf4", list(state.shape), torch.float32
    )
    return out.numpy()


def test_tables_match():
    np.testing.assert_array_equal(peft.NF4_LEVELS, bnb_f.get_4bit_type("nf4", device="cpu"))
    np.testing.assert_array_equal(quant.DYNAMIC_MAP, bnb_f.create_dynamic_map().numpy())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_and_constants_match(shape, double_quant):
    w = weight(shape)
    packed, state = bnb_quantize(w, double_quant)
    ours = jax.jit(lambda k: peft.quantize_nf4(k, double_quant=double_quant))(jnp.asarray(w.T))
    codes = np.asarray(ours.codes)
    n = packed.numel()
    np.testing.assert_array_equal(codes[:n], packed.numpy().ravel())
    assert np.all(codes[n:] == 0x77)  # padding to whole blocks: zero codes
    if not double_quant:
        np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())
        np.testing.assert_array_equal(
            np.asarray(peft.dequantize_nf4(ours)), bnb_dequantize(packed, state).T
        )
        return
    # The mean is summed in another order than torch's, so it may differ in
    # its last bit; the 8-bit codes are the reference kernel's.
    np.testing.assert_allclose(float(ours.absmax_offset), state.offset.item(), rtol=1e-6)
    raw = torch.ops.bitsandbytes.quantize_4bit.default(torch.from_numpy(w), 64, "nf4", torch.uint8)
    codes8, group_absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        REFERENCE, raw[1] - state.offset, bnb_f.create_dynamic_map(), 256
    )
    np.testing.assert_array_equal(np.asarray(ours.absmax), codes8.numpy())
    np.testing.assert_allclose(np.asarray(ours.absmax_scale), group_absmax.numpy(), rtol=1e-6)
    dynamic = bnb_f.create_dynamic_map()
    absmax = bnb_f.dequantize_blockwise(codes8, absmax=group_absmax, code=dynamic, blocksize=256)
    want = bnb_dequantize(packed, state, absmax + state.offset).T
    np.testing.assert_allclose(np.asarray(peft.dequantize_nf4(ours)), want, rtol=1e-6, atol=0)


def leaf_from_bitsandbytes(packed, state, shape, dtype) -> quant.NF4Weight:
    """bitsandbytes' quantized state as an ftjax leaf for the kernel `shape`."""
    n_blocks = state.absmax.numel()
    codes = np.full(n_blocks * 32, 0x77, np.uint8)  # zero codes pad the last block
    codes[: packed.numel()] = packed.numpy().ravel()
    if state.nested:
        scale, offset = state.state2.absmax.numpy(), state.offset.item()
    else:
        scale, offset = np.ones(1, np.float32), 0.0
    children = [codes, state.absmax.numpy(), scale, np.float32(offset)]
    return quant.NF4Weight._unflatten((shape, dtype), [jnp.asarray(c) for c in children])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_state_dequantizes_identically(dtype, double_quant):
    shape = (1024, 300)
    w = torch.from_numpy(weight(shape, seed=1)).to(getattr(torch, dtype))
    packed, state = bnb_f.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )
    leaf = leaf_from_bitsandbytes(packed, state, shape, dtype)
    dequantize = jax.jit(peft.dequantize_nf4, static_argnums=1)
    got = np.asarray(dequantize(leaf, jnp.float32))
    np.testing.assert_array_equal(got, bnb_dequantize(packed, state).T)
    # bitsandbytes' own CPU kernel agrees too (its blocks do not span rows here),
    # also when it returns the weight's dtype.
    cpu = bnb_f.dequantize_4bit(packed, state)
    got = np.asarray(dequantize(leaf, jnp.dtype(dtype)).astype(jnp.float32))
    np.testing.assert_array_equal(got, cpu.float().numpy().T)


def test_bfloat16_weights_quantize_like_bitsandbytes():
    w = torch.from_numpy(weight((256, 64), seed=2)).to(torch.bfloat16)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = peft.quantize_nf4(jnp.asarray(w.float().numpy().T, jnp.bfloat16), double_quant=False)
    np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().ravel())
    np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())
    assert ours.dtype == jnp.bfloat16


@pytest.mark.slow
def test_qlora_adapter_on_a_bitsandbytes_base(tmp_path):
    # The user's side: an adapter trained by ftjax's QLoRA, applied by PEFT to
    # the checkpoint loaded in 4 bits by transformers + bitsandbytes, gives
    # ftjax's logits up to bitsandbytes' CPU matmul (it computes in bfloat16):
    # far closer than to the unquantized model, so both quantized the same way.
    transformers = pytest.importorskip("transformers")
    torch_peft = pytest.importorskip("peft")
    from hf_fixtures import torch_logits

    from ftjax.models import from_pretrained

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,  # rows of W are whole blocks, as bitsandbytes' CPU kernels need
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        attn_implementation="eager",
    )
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(tmp_path / "base")
    ids = np.random.default_rng(0).integers(0, 97, (2, 9))
    model, base = from_pretrained(str(tmp_path / "base"))
    config = {"name": "qlora", "rank": 4, "alpha": 8, "targets": "attention"}
    params = peft.build_method(config).apply(base, jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: (
            x.replace(b=jnp.asarray(rng.normal(size=x.b.shape) * 0.1, x.b.dtype))
            if isinstance(x, peft.LoraWeight)
            else x
        ),
        params,
        is_leaf=peft.is_leaf,
    )
    unquantized = jax.tree.map(  # the same adapters over the dense base
        lambda x, w: x.replace(w=w) if isinstance(x, peft.LoraWeight) else w,
        params,
        base,
        is_leaf=peft.is_leaf,
    )
    forward = jax.jit(lambda p: model.apply({"params": p}, ids))
    ours, unquantized = np.asarray(forward(params)), np.asarray(forward(unquantized))
    peft.save_adapter(model.cfg, params, str(tmp_path / "adapter"), method=config)

    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "base"), quantization_config=quantization, dtype=torch.float32,
        device_map="cpu",
    )  # fmt: skip
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base.eval(), str(tmp_path / "adapter"))
    theirs = torch_logits(peft_model.eval(), ids)
    gap, quantization_error = np.abs(theirs - ours).max(), np.abs(unquantized - ours).max()
    assert gap < 1e-2 and gap < 0.05 * quantization_error, (gap, quantization_error)
