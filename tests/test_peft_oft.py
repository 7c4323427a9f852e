"""OFT (Qiu et al. 2023, HF PEFT's current form) against float64 numpy, closed
forms and PyTorch `peft`: the rotation blocks are the Cayley transform (exact,
orthogonal) or PEFT's truncated series of packed skew-symmetric blocks, equal
to PEFT's `OFTRotationModule`; the leaf computes `(x @ blockdiag(R)) @ w`;
block sizes follow PEFT's adjustment rule; trainable counts are
`blocks · b(b−1)/2` per kernel; adapters written by ftjax load in
`PeftModel.from_pretrained` with the same logits and adapters made by `peft`
import with the same logits on llama, mistral, qwen2 and qwen3, while GPT-2's
Conv1D (which PEFT's OFT cannot wrap) is refused; bad config fields are
refused by name; one train step's update is PEFT's gradient (and COFT's
projection of it)."""

import dataclasses
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft as torch_peft
import pytest
import torch
from hf_fixtures import VOCAB, checkpoint_loader, torch_base, torch_logits
from peft.tuners.oft import layer as peft_oft_layer

from ftjax import peft
from ftjax.models import ModelConfig, build_model, from_pretrained, layers
from ftjax.peft import oft_format, peft_format
from ftjax.peft.base import flatten_paths
from ftjax.train import StepConfig, TrainState, build_optimizer, default_optim_config, train_step

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
TOL = 1e-4
FIXTURES = {"llama": "llama2", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}  # fmt: skip


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """`loaded(family)`: (checkpoint dir, model, base params, jitted logits), once per family."""
    return checkpoint_loader(tiny_checkpoint, IDS, rename=FIXTURES)


def block_of(packed: int) -> int:
    """b with b(b-1)/2 == packed."""
    return (1 + math.isqrt(1 + 8 * packed)) // 2


def draw(rng, shape):
    """Trained-looking skew parameters: std 0.1/sqrt(b), so each block's skew
    matrix has norm near 0.2 (where PEFT's series is still near orthogonal)."""
    return rng.normal(size=shape) * 0.1 / math.sqrt(block_of(shape[-1]))


def randomize(params, seed=0):
    rng = np.random.default_rng(seed)

    def f(x):
        if not isinstance(x, peft.OFTWeight):
            return x
        return x.replace(q=jnp.asarray(draw(rng, x.q.shape), x.q.dtype))

    return jax.tree.map(f, params, is_leaf=peft.is_leaf)


def oft_leaves(params):
    return {p: x for p, x in flatten_paths(params) if isinstance(x, peft.OFTWeight)}


# ----------------------------------------------------------------------------- the math


def skew64(q, b):
    """The skew-symmetric matrix whose strict upper triangle, row by row, is q."""
    s, k = np.zeros((b, b)), 0
    for i in range(b):
        for j in range(i + 1, b):
            s[i, j], s[j, i] = q[k], -q[k]
            k += 1
    return s


def block_diag(blocks):
    n, b = len(blocks), blocks[0].shape[0]
    out = np.zeros((n * b, n * b))
    for i, r in enumerate(blocks):
        out[i * b : (i + 1) * b, i * b : (i + 1) * b] = r
    return out


def leaf_rotation(q, b, **static):
    """blockdiag(R) from an OFTWeight over the identity kernel."""
    static = dict(static)
    blocks = q.shape[0] if not static.get("shared") else static.pop("blocks")
    static.pop("shared", None)
    eye = jnp.eye(blocks * b, dtype=jnp.float32)
    leaf = peft.OFTWeight(eye, jnp.asarray(q, jnp.float32), b, **static)
    return np.asarray(leaf.materialize(), np.float64)


def test_exact_cayley_is_orthogonal_and_the_float64_transform():
    rng = np.random.default_rng(0)
    b, n = 8, 3
    q = rng.normal(size=(n, b * (b - 1) // 2)) * 0.1
    eye = np.eye(b)
    want = block_diag([(eye - skew64(v, b)) @ np.linalg.inv(eye + skew64(v, b)) for v in q])
    got = leaf_rotation(q, b, cayley_neumann=False)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.T @ got, np.eye(n * b), atol=1e-6)
    np.testing.assert_allclose(want.T @ want, np.eye(n * b), atol=1e-12)


def test_default_series_is_pefts_five_terms_in_float64():
    """PEFT's default: I + 2S + 2S² + 2S³ + S⁴, orthogonal up to the truncation."""
    rng = np.random.default_rng(1)
    b = 6
    q = rng.normal(size=(2, b * (b - 1) // 2)) * 0.02
    mats = [skew64(v, b) for v in q]
    p = np.linalg.matrix_power
    want = block_diag([np.eye(b) + 2 * s + 2 * p(s, 2) + 2 * p(s, 3) + p(s, 4) for s in mats])
    got = leaf_rotation(q, b)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got.T @ got - np.eye(2 * b)).max() < 1e-3  # off by about 2·S⁴


@pytest.mark.parametrize(
    "static",
    [
        {"neumann_terms": 1}, {"neumann_terms": 2}, {"neumann_terms": 3}, {"neumann_terms": 4},
        {"neumann_terms": 5}, {"neumann_terms": 7}, {"cayley_neumann": False},
        {"coft": True, "eps": 0.3}, {"coft": True, "eps": 0.3, "cayley_neumann": False},
        {"shared": True, "blocks": 3}, {"shared": True, "blocks": 3, "coft": True, "eps": 0.2},
    ],
)  # fmt: skip
def test_rotation_is_pefts_rotation_module(static):
    b = 5
    stored = 1 if static.get("shared") else 3
    q = np.random.default_rng(2).normal(size=(stored, b * (b - 1) // 2)) * 0.1
    module = peft_oft_layer.OFTRotationModule(
        stored, q.shape[1], b, 3 * b, coft=static.get("coft", False), eps=static.get("eps", 6e-5),
        block_share=bool(static.get("shared")), use_cayley_neumann=static.get("cayley_neumann", True),
        num_cayley_neumann_terms=static.get("neumann_terms", 5),
    )  # fmt: skip
    with torch.no_grad():
        module.weight.copy_(torch.tensor(q))
    want = module.get_weight().detach().double().numpy()
    got = leaf_rotation(q, b, **static)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_leaf_forward_and_merge_are_the_rotated_kernel():
    rng = np.random.default_rng(3)
    fan_in, fan_out, b = 12, 5, 4
    w, bias, x = rng.normal(size=(fan_in, fan_out)), rng.normal(size=fan_out), rng.normal(size=(2, 7, fan_in))  # fmt: skip
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    for shared in (False, True):
        q = rng.normal(size=(1 if shared else 3, 6)) * 0.3
        eye = np.eye(b)
        blocks = [(eye - skew64(v, b)) @ np.linalg.inv(eye + skew64(v, b)) for v in q]
        rot = block_diag(blocks * 3 if shared else blocks)
        want = x @ rot @ w + bias  # PEFT: the base layer applied to x rotated block by block
        leaf = peft.init_oft(f32(w), block_size=b, block_share=shared, cayley_neumann=False)
        assert leaf.q.shape == q.shape and leaf.block_share == shared
        leaf = leaf.replace(q=f32(q))
        np.testing.assert_allclose(np.asarray(layers.linear(f32(x), leaf, f32(bias))), want, atol=1e-5)  # fmt: skip
        merged = peft.merge({"dense": {"kernel": leaf, "bias": f32(bias)}})["dense"]
        np.testing.assert_allclose(x @ np.asarray(merged["kernel"]) + bias, want, atol=1e-5)


def test_block_layout_is_pefts():
    """Block sizes that do not divide the input size are adjusted as PEFT's
    OFT layer adjusts them (read back from a PEFT layer over nn.Linear)."""
    from ftjax.peft.oft import block_layout

    for fan_in in (12, 48, 50, 97):
        for field in ("oft_block_size", "r"):
            for value in (1, 5, 7, 16, 32, 60):
                config = torch_peft.OFTConfig(**{"r": 0, "oft_block_size": 0, field: value},
                                              target_modules=["x"])  # fmt: skip
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    layer = peft_oft_layer.Linear(torch.nn.Linear(fan_in, 3), "default", config, r=config.r)  # fmt: skip
                ours = block_layout(fan_in, **{"block_size" if field != "r" else "rank": value})
                assert ours == (layer.r["default"], layer.oft_block_size["default"]), (fan_in, field, value)  # fmt: skip


# ----------------------------------------------------------------------------- method, counts


def test_init_is_identity_and_defaults_are_pefts(loaded):
    _, _, base, logits = loaded("llama")
    method = peft.build_method({"name": "oft", "targets": ["q_proj", "down_proj"]})
    params = method.apply(base, jax.random.key(0))
    leaves = oft_leaves(params)
    assert len(leaves) == 4
    for path, leaf in leaves.items():
        # PEFT's default oft_block_size 32: q (32 inputs) one block, down (48) two of 24.
        want = (1, 496) if "q_proj" in path else (2, 276)
        assert leaf.q.shape == want and not np.asarray(leaf.q).any()
        assert (leaf.cayley_neumann, leaf.neumann_terms, leaf.coft) == (True, 5, False)
    np.testing.assert_allclose(np.asarray(logits(params)), np.asarray(logits(base)), atol=1e-6)
    defaults = torch_peft.OFTConfig()
    assert (defaults.r, defaults.oft_block_size, defaults.use_cayley_neumann,
            defaults.num_cayley_neumann_terms, defaults.coft, defaults.eps, defaults.block_share) == (
        method.config["rank"], method.config["block_size"], method.config["cayley_neumann"],
        method.config["neumann_terms"], method.config["coft"], method.config["eps"],
        method.config["block_share"])  # fmt: skip


LLAMA = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                    num_kv_heads=2)  # fmt: skip


@pytest.mark.parametrize(
    "options, per_layer",
    [
        ({}, 496 + 496),  # q and v: 32 inputs, one block of 32
        ({"block_size": 8}, 2 * 4 * 28),
        ({"block_size": 8, "block_share": True}, 2 * 28),
        ({"rank": 4, "block_size": 0, "targets": ["down_proj"]}, 4 * 66),  # 48 = 4 x 12
        ({"targets": "all-linear"}, 6 * 496 + 2 * 276),  # down: 48 -> two blocks of 24
    ],
)
def test_closed_form_counts(options, per_layer):
    method = peft.build_method({"name": "oft", **options})
    shapes = jax.eval_shape(build_model(LLAMA).init, jax.random.key(0), np.zeros((1, 4), np.int32))
    params = jax.eval_shape(lambda p: method.apply(p, jax.random.key(0)), shapes["params"])
    trainable, _ = method.count(params)
    assert trainable == LLAMA.num_layers * per_layer
    trainable_tree, _ = method.split(params)
    assert sum(x.size for x in jax.tree.leaves(trainable_tree)) == trainable


def test_llama2_7b_count_from_shapes():
    """Llama-2 7B, all linear layers, b = 32: 128 blocks of 496 on each of the
    six 4096-input projections and 344 on down_proj (11008 inputs), 32 layers:
    32 · (6 · 128 + 344) · 496 = 17,649,664."""
    from ftjax.study.param_counts import count_setting

    llama7b = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                   num_heads=32, num_kv_heads=32)  # fmt: skip
    trainable, _ = count_setting({"model": llama7b, "method": {"name": "oft", "targets": "all-linear"}})  # fmt: skip
    assert trainable == 32 * (6 * 128 + 344) * 496 == 17_649_664


@pytest.mark.parametrize(
    "options, match",
    [
        ({"rank": 4}, "method.rank: exactly one of rank"),
        ({"block_size": 0}, "method.rank: exactly one of rank"),
        ({"block_size": -2}, "method.block_size: must be a non-negative"),
        ({"neumann_terms": 0}, "method.neumann_terms"),
        ({"eps": 0.0}, "method.eps"),
        ({"coft": 1}, "method.coft: must be a bool"),
        ({"module_dropout": 0.1}, "method.module_dropout: not an option"),
    ],
)
def test_bad_options_are_refused_by_name(options, match):
    with pytest.raises(peft.PeftError, match=match):
        peft.build_method({"name": "oft", **options})


# ----------------------------------------------------------------------------- HF PEFT files

# One setting per architecture, so that the four cover PEFT's options between them.
SETTINGS = {
    # PEFT's defaults: blocks of 32 (24 on down_proj's 48 inputs), the 5-term series.
    "llama": {"targets": ["q_proj", "v_proj", "down_proj"]},
    "mistral": {"rank": 4, "block_size": 0, "cayley_neumann": False, "targets": "all-linear"},
    "qwen2": {
        "block_size": 8,
        "coft": True,
        "eps": 0.5,
        "targets": ["q_proj", "o_proj", "up_proj"],
    },
    "qwen3": {
        "block_size": 16,
        "block_share": True,
        "neumann_terms": 3,
        "targets": ["k_proj", "gate_proj", "down_proj"],
    },
    "gpt2": {"targets": "qv"},
}
DIRECTIONS = ("ftjax_to_peft", "peft_to_ftjax")
CASES = [pytest.param(f, d, id=f"{f}-{d}") for f in SETTINGS for d in DIRECTIONS]


def peft_config(options):
    """The PEFT OFTConfig of a setting of ours."""
    targets = options["targets"]
    return torch_peft.OFTConfig(
        r=options.get("rank", 0), oft_block_size=options.get("block_size", 32),
        target_modules=targets if isinstance(targets, str) else list(targets),
        block_share=options.get("block_share", False), coft=options.get("coft", False),
        eps=options.get("eps", 6e-5), use_cayley_neumann=options.get("cayley_neumann", True),
        num_cayley_neumann_terms=options.get("neumann_terms", 5),
    )  # fmt: skip


def peft_made(path, options, out, seed=0):
    """A PEFT OFT adapter of `options`, its rotations randomized, saved to `out`;
    returns PEFT's logits."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    peft_model = torch_peft.get_peft_model(torch_base(path), peft_config(options))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "oft_R" in name:
                p.copy_(torch.tensor(draw(rng, tuple(p.shape)), dtype=p.dtype))
    peft_model.eval()
    peft_model.save_pretrained(str(out))
    return torch_logits(peft_model, IDS)


def ftjax_to_peft(family, loaded, tmp_path):
    path, model, base, logits = loaded(family)
    options = SETTINGS[family]
    method = peft.build_method({"name": "oft", **options})
    params = randomize(jax.jit(method.apply)(base, jax.random.key(0)))
    if family == "gpt2":
        with pytest.raises(peft.AdapterFormatError, match="Conv1D") as info:
            peft.save_adapter(model.cfg, params, str(tmp_path), method=method)
        assert "\n" not in str(info.value)
        return None
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 20 * TOL  # the adapter matters
    written = method_export(method, model, params, tmp_path)
    # The method's own setting is written (PEFT adjusts it per layer as ftjax did).
    want = {"r": options.get("rank", 0), "oft_block_size": options.get("block_size", 32)}
    assert {k: written[k] for k in want} == want
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path))
    assert isinstance(peft_model.peft_config["default"], torch_peft.OFTConfig)
    diff = float(np.abs(torch_logits(peft_model, IDS) - ours).max())
    np.testing.assert_allclose(torch_logits(peft_model.merge_and_unload(), IDS), ours, atol=TOL)
    np.testing.assert_allclose(np.asarray(logits(jax.jit(peft.merge)(params))), ours, atol=TOL)
    reloaded = peft.load_adapter(model.cfg, base, str(tmp_path))
    assert set(oft_leaves(reloaded)) == set(oft_leaves(params))
    np.testing.assert_allclose(np.asarray(logits(reloaded)), ours, atol=1e-6)
    return diff


def method_export(method, model, params, out):
    from ftjax.peft.registry import get

    return get("oft").export(model.cfg, params, str(out), method.config)


def peft_to_ftjax(family, loaded, tmp_path):
    path, model, base, logits = loaded(family)
    options = SETTINGS[family]
    if family == "gpt2":
        # The ground truth for the refusal: PEFT's OFT rejects GPT-2's Conv1D layers...
        with pytest.raises(TypeError, match="not supported"):
            torch_peft.get_peft_model(torch_base(path), peft_config({"targets": ["c_attn"]}))
        # ...so an OFT file naming them (here one written for Llama, renamed) is refused.
        llama_dir = tmp_path / "llama"
        peft_made(loaded("llama")[0], {"targets": ["q_proj"]}, llama_dir)
        config, tensors = peft.read_adapter(str(llama_dir))
        renamed = {k.replace("model.layers.", "transformer.h.").replace("self_attn.q_proj", "attn.c_attn"): v
                   for k, v in tensors.items()}  # fmt: skip
        peft_format.write_files(str(tmp_path), {**config, "target_modules": ["c_attn"]}, renamed)
        with pytest.raises(peft.AdapterFormatError, match="Conv1D") as info:
            peft.load_adapter(model.cfg, base, str(tmp_path))
        assert "\n" not in str(info.value)
        return None
    want = peft_made(path, options, tmp_path)
    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    ours = np.asarray(logits(params))
    assert np.abs(ours - np.asarray(logits(base))).max() > 20 * TOL
    diff = float(np.abs(ours - want).max())
    scanned_model, scanned_base = from_pretrained(path, scan_layers=True)
    scanned = peft.load_adapter(scanned_model.cfg, scanned_base, str(tmp_path))
    out = jax.jit(lambda p: scanned_model.apply({"params": p}, IDS))(scanned)
    np.testing.assert_allclose(np.asarray(out), want, atol=TOL)
    # Written back from the stacked tree, the tensors are the ones PEFT wrote.
    _, tensors = peft.read_adapter(str(tmp_path))
    _, rewritten = oft_format.adapter_state(scanned_model.cfg, scanned)
    assert set(rewritten) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(rewritten[key], np.asarray(value))
    return diff


@pytest.mark.parametrize("family, direction", CASES)
def test_round_trip_with_peft(loaded, tmp_path, family, direction):
    run = ftjax_to_peft if direction == "ftjax_to_peft" else peft_to_ftjax
    diff = run(family, loaded, tmp_path)
    if diff is None:
        print(f"\nOFT {family} {direction}: refused (PEFT cannot wrap GPT-2's Conv1D)")
        return
    print(f"\nOFT {family} {direction}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL


@pytest.fixture(scope="module")
def saved(loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("peft_oft")
    peft_made(loaded("llama")[0], {"targets": ["q_proj", "v_proj"], "block_size": 8}, out)
    return out


def edit(src, dst, drop=(), **changes):
    config, tensors = peft.read_adapter(str(src))
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    peft_format.write_files(str(dst), {**config, **changes}, tensors)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"


@pytest.mark.parametrize(
    "changes, drop, match",
    [
        ({"a_future_peft_field": 1}, (), "field 'a_future_peft_field' is unknown .*OFTConfig"),
        ({"bias": "oft_only"}, (), "bias='oft_only' is not supported"),
        ({"layers_to_transform": [0]}, (), r"layers_to_transform=\[0\] is not supported"),
        ({"modules_to_save": ["lm_head"]}, (), "modules_to_save=\\['lm_head'\\] is not supported"),
        ({"r": 4}, (), "r=4 and oft_block_size=8; PEFT needs exactly one"),
        ({"oft_block_size": 4}, (), r"q_proj' has oft_R.weight of shape \(4, 28\); PEFT builds \(8, 6\)"),
        ({"block_share": True}, (), r"shape \(4, 28\); PEFT builds \(1, 28\)"),
        ({"target_modules": ["q_proj"]}, (), "v_proj' has an OFT rotation but target_modules"),
        ({"peft_version": "0.17.1"}, (), "peft_version='0.17.1' is older than 0.18.0"),
        ({"init_weights": False}, (Q0,), "layers.0.self_attn.q_proj' is targeted but has no OFT"),
        ({"use_cayley_neumann": "yes"}, (), "use_cayley_neumann='yes' is not supported"),
    ],
)  # fmt: skip
def test_import_refuses_what_it_cannot_honour(loaded, saved, tmp_path, changes, drop, match):
    edit(saved, tmp_path, drop, **changes)
    _, model, base, _ = loaded("llama")
    with pytest.raises(peft.AdapterFormatError, match=match) as info:
        peft.load_adapter(model.cfg, base, str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_missing_targeted_module_gets_pefts_identity_init(loaded, saved, tmp_path):
    edit(saved, tmp_path, (Q0,))
    path, model, base, logits = loaded("llama")
    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    leaf = oft_leaves(params)["model/layers_0/self_attn/q_proj/kernel"]
    assert not np.asarray(leaf.q).any()
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path))
    np.testing.assert_allclose(np.asarray(logits(params)), torch_logits(peft_model, IDS), atol=TOL)


def test_every_oft_config_field_is_classified():
    fields = {f.name for f in dataclasses.fields(torch_peft.OFTConfig)}
    assert fields - set(oft_format.CONFIG_FIELDS) == set()
    config = torch_peft.OFTConfig(target_modules=["q_proj"]).to_dict()
    defaults = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))  # fmt: skip
    peft_format.check_config(defaults, "defaults", oft_format.CONFIG_FIELDS, kind="OFTConfig")


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("coft", [False, True], ids=["oft", "coft"])
def test_one_train_step_follows_peft_gradient(loaded, tmp_path, coft):
    """SGD at lr 1: ftjax's step is minus PEFT's gradient; with COFT, PEFT
    differentiates at its projected weight and ftjax stores the projection of
    (projected weight − gradient), with PEFT's own projection as reference."""
    path, model, base, _ = loaded("llama")
    options = {"block_size": 8, "targets": ["q_proj", "v_proj", "down_proj"]}
    if coft:
        options.update(coft=True, eps=0.5)
    method = peft.build_method({"name": "oft", **options})
    params = randomize(method.apply(base, jax.random.key(0)), seed=3)
    peft.save_adapter(model.cfg, params, str(tmp_path))
    batch = {"input_ids": IDS[:, :-1], "targets": IDS[:, 1:],
             "loss_mask": np.ones(IDS[:, 1:].shape, np.float32)}  # fmt: skip
    optim = default_optim_config()
    optim.update(name="sgd", momentum=0.0, lr=1.0, schedule="constant", clip_norm=0.0)
    tx, schedule = build_optimizer(optim, 10)
    tx = method.optimizer(tx, schedule, 10)
    trainable, frozen = method.split(params)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable),
                       jax.random.key_data(jax.random.key(0)), jnp.zeros((), jnp.int32))  # fmt: skip
    new, metrics = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, cfg=StepConfig()))(
        state, batch
    )

    peft_model = torch_peft.PeftModel.from_pretrained(
        torch_base(path), str(tmp_path), is_trainable=True
    )
    out = peft_model(torch.tensor(batch["input_ids"])).logits
    loss = torch.nn.functional.cross_entropy(
        out.reshape(-1, out.shape[-1]), torch.tensor(batch["targets"]).reshape(-1)
    )
    loss.backward()
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
    rotations = {n: m for n, m in peft_model.named_modules() if n.endswith("oft_R.default")}
    before, after = oft_leaves(params), oft_leaves(peft.combine(new.trainable, new.frozen))
    assert len(rotations) == len(before) == 6  # only the rotations train, in both
    assert sum(p.grad is not None for p in peft_model.parameters()) == 6
    for p, leaf in before.items():
        module = rotations[f"base_model.model.{peft_format._module(model.cfg, p)}.oft_R.default"]
        grad = module.weight.grad.numpy()
        assert np.abs(grad).max() > 0
        step = np.asarray(after[p].q) - np.asarray(leaf.q)
        if not coft:
            np.testing.assert_allclose(-step, grad, rtol=1e-3, atol=1e-4 * np.abs(grad).max())
        else:
            with torch.no_grad():  # PEFT's weight is projected in place by its forward
                want = module._project_batch(module.weight - module.weight.grad, eps=module.eps)
            np.testing.assert_allclose(np.asarray(after[p].q), want.numpy(), rtol=1e-4,
                                       atol=1e-4 * np.abs(grad).max())  # fmt: skip
        np.testing.assert_array_equal(np.asarray(after[p].w), np.asarray(leaf.w))


@pytest.mark.slow
def test_quick_run_trains_checkpoints_and_exports_oft(tmp_path):
    from test_peft_vera import quick_run_trains_checkpoints_and_exports

    result = quick_run_trains_checkpoints_and_exports(
        tmp_path, "method=oft,block_size=8", "OFT", peft.OFTWeight
    )
    leaves = oft_leaves(result.params)
    assert all(np.abs(np.asarray(x.q)).max() > 0 for x in leaves.values())  # it trained


@pytest.mark.slow
def test_count_params_script_counts_oft():
    """experiments/quick/train.py's Llama: q (32 -> 32) and v (32 -> 16), 2
    layers; b = 8: 4 blocks of 28 on each."""
    from hf_fixtures import ROOT, run_script

    result = run_script("count_params.py", "--config=experiments/quick/train.py:method=oft,block_size=8",
                        cwd=ROOT, env={"JAX_PLATFORMS": "cpu"}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert any(f"{2 * 2 * 4 * 28:,}" in row for row in cells), result.stdout
