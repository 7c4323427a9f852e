"""Prompt tuning (Lester et al., 2021) and prefix tuning (Li & Liang, 2021)
against PyTorch `peft` and against decoding without a cache: ftjax's adapters
load in `PeftModel.from_pretrained` with the same logits on the real tokens,
and adapters made (and randomized) in `peft` import with the same logits, on
Llama, Mistral (sliding window), Qwen2, Qwen3 and GPT-2; scanned layers and
the chunked loss agree with the plain forward; cached greedy generation
equals greedy decoding by full forward passes; one train step follows
PEFT's gradient; a quick run trains, checkpoints and exports; packed rows
see the virtual tokens as each example alone would; bad options and bad
files are refused by name."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft as torch_peft
import pytest
import torch
from hf_fixtures import VOCAB, tiny_model, torch_base

from ftjax import peft
from ftjax.errors import ModelError
from ftjax.eval import generate, left_pad
from ftjax.models import from_pretrained, init_kv_cache, save_pretrained
from ftjax.models.decoder import KV_PREFIX, VIRTUAL_TOKENS, cached_virtual_length
from ftjax.peft import prompt_format
from ftjax.peft.base import flatten_paths
from ftjax.train import StepConfig, TrainState, build_optimizer, default_optim_config, train_step
from ftjax.train.step import eval_step

FAMILIES = {
    "llama": "llama3",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gpt2": "gpt2",
}
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
MASK = np.ones_like(IDS)
MASK[1, -2:] = 0  # right padding: PEFT numbers positions from the first virtual token
N = 5
TOL = 1e-4
METHODS = {
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": N},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": N},
}
PEFT_CONFIGS = {
    "prompt_tuning": lambda: torch_peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N
    ),
    "prefix_tuning": lambda: torch_peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N
    ),
}


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """`loaded(family, scan=False)`: (checkpoint dir, model, base params, jitted logits)."""
    cache = {}

    def get(family, scan=False):
        if (family, scan) not in cache:
            path = tiny_checkpoint(FAMILIES[family])
            model, params = from_pretrained(path, scan_layers=scan)
            logits = jax.jit(lambda p, m=model: m.apply({"params": p}, IDS, attention_mask=MASK))
            cache[family, scan] = (path, model, params, logits)
        return cache[family, scan]

    return get


def peft_logits(peft_model, method: str) -> np.ndarray:
    """PEFT's logits of the real tokens (prompt tuning returns the virtual ones too)."""
    with torch.no_grad():
        out = peft_model(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    return out[:, N:] if method == "prompt_tuning" else out


def assert_real_close(got, want):
    real = MASK.astype(bool)
    diff = float(np.abs(np.asarray(got)[real] - want[real]).max())
    assert diff <= TOL, diff
    return diff


DIRECTIONS = [(f, d) for f in FAMILIES for d in ("ftjax_to_peft", "peft_to_ftjax")]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family,direction", DIRECTIONS, ids=[f"{f}-{d}" for f, d in DIRECTIONS])
def test_round_trip_with_peft(loaded, tmp_path, method, family, direction):
    path, model, base, logits = loaded(family)
    if direction == "ftjax_to_peft":
        params = peft.build_method(METHODS[method]).apply(base, jax.random.key(1))
        config = peft.save_adapter(model.cfg, params, str(tmp_path))
        assert config["peft_type"] == method.upper()
        peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path)).eval()
    else:
        torch.manual_seed(2)
        peft_model = torch_peft.get_peft_model(torch_base(path), PEFT_CONFIGS[method]())
        with torch.no_grad():  # a trained-looking prompt, not PEFT's init
            for p in peft_model.prompt_encoder.parameters():
                p.copy_(torch.randn_like(p))
        peft_model.save_pretrained(str(tmp_path))
        peft_model.eval()
        params = peft.load_adapter(model.cfg, base, str(tmp_path))
    key = VIRTUAL_TOKENS if method == "prompt_tuning" else KV_PREFIX
    assert set(params) - set(base) == {key}
    assert np.abs(np.asarray(params[key].materialize())).max() > 0.5  # non-trivial
    got = logits(params)
    print(
        f"{method} {family} {direction}: max |diff| = {assert_real_close(got, peft_logits(peft_model, method)):.2e}"
    )
    assert np.abs(np.asarray(got - logits(base))).max() > 1e-2  # the tokens change the output


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_projection_exports_its_output(loaded, tmp_path, family):
    """The MLP trains; the file holds its output, which PEFT attends to."""
    path, model, base, logits = loaded(family)
    method = peft.build_method(
        {"name": "prefix_tuning", "num_virtual_tokens": N, "prefix_projection": True,
         "encoder_hidden_size": 8}
    )  # fmt: skip
    params = method.apply(base, jax.random.key(3))
    leaf = params[KV_PREFIX]
    assert isinstance(leaf, peft.PrefixMlpWeight) and leaf.w1.shape[1] == 8
    trainable, _ = method.split(params)
    assert [x.shape for x in jax.tree.leaves(trainable)] == [
        leaf.embedding.shape, leaf.w1.shape, leaf.b1.shape, leaf.w2.shape, leaf.b2.shape,
    ]  # fmt: skip
    config = peft.save_adapter(model.cfg, params, str(tmp_path))
    assert config["prefix_projection"] is False
    peft_model = torch_peft.PeftModel.from_pretrained(torch_base(path), str(tmp_path)).eval()
    assert_real_close(logits(params), peft_logits(peft_model, "prefix_tuning"))
    np.testing.assert_allclose(logits(peft.merge(params)), logits(params), atol=1e-6)


def test_peft_prefix_projection_imports(loaded, tmp_path):
    """PEFT saves a projected prefix's output: it imports as a plain prefix."""
    path, model, base, logits = loaded("qwen2")
    torch.manual_seed(4)
    config = torch_peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=8
    )
    peft_model = torch_peft.get_peft_model(torch_base(path), config)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.copy_(torch.randn_like(p))
    peft_model.save_pretrained(str(tmp_path))
    params = peft.load_adapter(model.cfg, base, str(tmp_path))
    assert_real_close(logits(params), peft_logits(peft_model.eval(), "prefix_tuning"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_scanned_layers_and_chunked_loss_agree(loaded, method):
    _, model, base, logits = loaded("mistral")
    _, scanned_model, scanned_base, scanned_logits = loaded("mistral", scan=True)
    m = peft.build_method(METHODS[method])
    params = m.apply(base, jax.random.key(5))
    scanned = m.apply(scanned_base, jax.random.key(5))
    np.testing.assert_allclose(scanned_logits(scanned), logits(params), atol=1e-5)
    batch = {"input_ids": IDS[:, :-1], "attention_mask": MASK[:, :-1],
             "targets": IDS[:, 1:], "loss_mask": MASK[:, 1:].astype(np.float32)}  # fmt: skip
    trainable, frozen = m.split(params)
    dense = eval_step(trainable, frozen, batch, model=model, loss_chunk=0)
    chunked = eval_step(trainable, frozen, batch, model=model, loss_chunk=3)
    np.testing.assert_allclose(chunked["loss_sum"], dense["loss_sum"], rtol=1e-5)
    assert float(dense["count"]) == MASK[:, 1:].sum()  # virtual tokens carry no loss


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_packed_examples_see_the_virtual_tokens_as_if_alone(loaded, method, family):
    _, model, base, _ = loaded(family)
    params = peft.build_method(METHODS[method]).apply(base, jax.random.key(8))
    a, b = IDS[0, :5], IDS[1, :7]  # longer than mistral's window of 6 with the prompt
    row = np.concatenate([a, b])[None]
    packed = model.apply(
        {"params": params},
        row,
        positions=np.concatenate([np.arange(5), np.arange(7)])[None],
        segment_ids=np.array([[1] * 5 + [2] * 7]),
    )
    for got, ids in ((packed[0, :5], a), (packed[0, 5:], b)):
        alone = model.apply({"params": params}, ids[None])[0]
        np.testing.assert_allclose(got, alone, atol=2e-5)


# ----------------------------------------------------------------------------- generation

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12, 7], [33, 2, 71, 4]]  # left padding in the batch


def _greedy_without_cache(forward, params, prompt, steps):
    """Greedy decoding by a full forward pass over the whole sequence per step,
    right-padded to one width (causal attention cannot see the padding)."""
    ids = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, 24), np.int32)
        padded[0, : len(ids)] = ids
        ids.append(int(np.argmax(np.asarray(forward(params, padded))[0, len(ids) - 1])))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "method,model_type,scan",
    [("prompt_tuning", "llama", False), ("prompt_tuning", "gpt2", True),
     ("prefix_tuning", "llama", True), ("prefix_tuning", "gpt2", False)],
)  # fmt: skip
def test_cached_greedy_equals_full_forward_decoding(method, model_type, scan):
    model, base = tiny_model(model_type, scan)
    params = peft.build_method(METHODS[method]).apply(base, jax.random.key(6))
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    out = generate(model, params, PROMPTS, max_new_tokens=8)
    want = [_greedy_without_cache(forward, params, p, 8) for p in PROMPTS]
    assert out.sequences() == want
    assert len({tuple(w) for w in want}) == 3
    row = np.asarray([PROMPTS[0] + want[0]])
    assert np.abs(forward(params, row) - forward(base, row)).max() > 1e-2  # they matter


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cached_logits_equal_full_forward_logits(method):
    """The KV-cache path itself, step by step, with left padding and virtual
    tokens strong enough to change every prediction: each step's logits are
    those of a full forward pass over that row's tokens so far."""
    model, base = tiny_model("llama")
    params = peft.build_method(METHODS[method]).apply(base, jax.random.key(6))
    key = VIRTUAL_TOKENS if method == "prompt_tuning" else KV_PREFIX
    params = {**params, key: peft.PromptWeight(5.0 * params[key].table)}
    ids, mask = left_pad(PROMPTS)
    b, width = ids.shape
    cache = init_kv_cache(model.cfg, b, cached_virtual_length(params) + width + 4)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    step = jax.jit(lambda p, i, m, pos, c: model.apply(
        {"params": p}, i, attention_mask=m, positions=pos, cache=c))  # fmt: skip
    logits, cache = step(params, ids, mask, positions, cache)
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    rows = [list(p) for p in PROMPTS]
    last, pos = logits[:, -1], positions[:, -1]
    for _ in range(4):
        for r, seq in enumerate(rows):
            padded = np.zeros((1, 16), np.int32)  # right padding: invisible, one program
            padded[0, : len(seq)] = seq
            full = forward(params, padded)[0, len(seq) - 1]
            np.testing.assert_allclose(last[r], full, atol=2e-5)
            if _ == 0:  # the virtual tokens change the prediction
                alone = forward(base, padded)[0, len(seq) - 1]
                assert np.abs(full - alone).max() > 1e-2
        token = np.asarray(jnp.argmax(last, -1), np.int32)
        rows = [seq + [int(t)] for seq, t in zip(rows, token)]
        pos = pos + 1
        logits, cache = step(params, token[:, None], np.ones((b, 1), np.int32), pos[:, None], cache)
        last = logits[:, 0]


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_train_step_follows_peft_gradient(loaded, tmp_path, method):
    path, model, base, _ = loaded("llama")
    m = peft.build_method(METHODS[method])
    params = m.apply(base, jax.random.key(7))
    mask = MASK[:, 1:].astype(np.float32)
    batch = {"input_ids": IDS[:, :-1], "targets": IDS[:, 1:], "loss_mask": mask}
    optim = default_optim_config()
    optim.update(name="sgd", momentum=0.0, lr=1.0, schedule="constant", clip_norm=0.0)
    tx, _ = build_optimizer(optim, 10)
    trainable, frozen = m.split(params)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable),
                       jax.random.key_data(jax.random.key(0)), jnp.zeros((), jnp.int32))  # fmt: skip
    new, metrics = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, cfg=StepConfig()))(
        state, batch
    )
    # PEFT loads prompt-learning adapters for inference only: build one, set its table.
    key = VIRTUAL_TOKENS if method == "prompt_tuning" else KV_PREFIX
    peft_model = torch_peft.get_peft_model(torch_base(path), PEFT_CONFIGS[method]())
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(
            torch.tensor(np.asarray(params[key].table))
        )
    out = peft_model(torch.tensor(batch["input_ids"])).logits
    out = out[:, N:] if method == "prompt_tuning" else out
    losses = torch.nn.functional.cross_entropy(
        out.reshape(-1, out.shape[-1]), torch.tensor(batch["targets"]).reshape(-1), reduction="none"
    )
    loss = (losses * torch.tensor(mask).reshape(-1)).sum() / mask.sum()
    loss.backward()
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
    grads = [p.grad.numpy() for p in peft_model.parameters() if p.grad is not None]
    assert len(grads) == 1  # the table only, in both
    before = np.asarray(params[key].table)
    after = np.asarray(peft.combine(new.trainable, new.frozen)[key].table)
    np.testing.assert_allclose(before - after, grads[0], atol=1e-5)  # sgd, lr 1
    assert np.abs(grads[0]).max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["method=prompt_tuning,num_virtual_tokens=4,init=vocab",
                                 "method=prefix_tuning,num_virtual_tokens=4,prefix_projection=1"])  # fmt: skip
def test_quick_run_trains_checkpoints_and_exports(tmp_path, arg):
    import importlib.util
    import os

    from hf_fixtures import ROOT

    from ftjax.train import train
    from ftjax.train.restore import restore_run
    from ftjax.train.state import seed_keys

    spec = importlib.util.spec_from_file_location(
        "quick_train_config", os.path.join(ROOT, "experiments", "quick", "train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    cfg.train.steps = 4
    result = train(cfg, str(tmp_path / "run"))
    key = VIRTUAL_TOKENS if "prompt" in arg else KV_PREFIX
    start = peft.build_method(cfg.method).apply(
        result.base_params, seed_keys(cfg.train.seed).method
    )
    assert set(result.params) - set(result.base_params) == {key}
    base = dict(flatten_paths(result.base_params))
    for path, x in flatten_paths({k: v for k, v in result.params.items() if k != key}):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(base[path]))  # frozen
    _, restored, _, step = restore_run(cfg, str(tmp_path / "run"))
    assert step == 4
    for got, want in zip(jax.tree.leaves(restored[key]), jax.tree.leaves(result.params[key])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(
        np.asarray(result.params[key].materialize()), np.asarray(start[key].materialize())
    )  # it trained
    assert any(k.startswith("eval") or "loss" in k for k in result.summary)
    with open(tmp_path / "run" / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == (
            "PROMPT_TUNING" if "prompt" in arg else "PREFIX_TUNING"
        )
    model = result.model
    back = peft.load_adapter(model.cfg, result.base_params, str(tmp_path / "run" / "adapter"))
    ids = IDS % cfg.model.init.vocab_size
    run = jax.jit(lambda p: model.apply({"params": p}, ids))
    np.testing.assert_allclose(np.asarray(run(back)), np.asarray(run(result.params)), atol=1e-5)
    out = generate(model, result.params, [[1, 2, 3], [4]], max_new_tokens=4)
    assert out.tokens.shape == (2, 4)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "config,field",
    [
        ({"name": "prompt_tuning", "num_virtual_tokens": 0}, "method.num_virtual_tokens"),
        ({"name": "prompt_tuning", "init": "words"}, "method.init"),
        ({"name": "prompt_tuning", "init": "text"}, "method.init_text"),
        ({"name": "prompt_tuning", "init_text": "hi"}, "method.init_text"),
        ({"name": "prefix_tuning", "encoder_hidden_size": 8}, "method.encoder_hidden_size"),
        ({"name": "prefix_tuning", "init": "text"}, "method.init"),
        ({"name": "prefix_tuning", "prefix_projection": "maybe"}, "method.prefix_projection"),
        ({"name": "prefix_tuning", "rank": 4}, "method.rank"),
    ],
)
def test_bad_options_are_refused_by_name(config, field):
    with pytest.raises(peft.PeftError, match=field):
        peft.build_method(config)


def test_text_init_takes_the_texts_token_embeddings(loaded, tmp_path):
    from hf_fixtures import char_tokenizer

    tok = char_tokenizer()
    tok.save_pretrained(str(tmp_path))
    _, _, base, _ = loaded("llama")
    method = peft.build_method({"name": "prompt_tuning", "num_virtual_tokens": 5, "init": "text",
                                "init_text": "abc", "tokenizer": str(tmp_path)})  # fmt: skip
    table = np.asarray(method.apply(base, jax.random.key(0))[VIRTUAL_TOKENS].table)
    ids = tok("abc")["input_ids"]
    want = np.asarray(base["model"]["embed_tokens"]["embedding"])[(ids * 5)[:5]]
    np.testing.assert_array_equal(table, want)


def _write(tmp_path, config, tensors):
    from ftjax.peft.peft_format import write_files

    write_files(str(tmp_path), config, tensors)
    return str(tmp_path)


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"num_transformer_submodules": 2}, "num_transformer_submodules"),
        ({"token_dim": 7}, "token_dim=7"),
        ({"num_layers": 3}, "num_layers=3"),
        ({"some_future_field": 1}, "'some_future_field' is unknown"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_weights": "ones"}, "init_weights"),
    ],
)
def test_bad_prefix_files_are_refused_by_name(loaded, tmp_path, change, fragment):
    _, model, base, _ = loaded("llama")
    params = peft.build_method(METHODS["prefix_tuning"]).apply(base, jax.random.key(0))
    config, tensors = prompt_format.adapter_state(model.cfg, params)
    where = _write(tmp_path, {**config, **change}, tensors)
    with pytest.raises(peft.AdapterFormatError, match=fragment):
        peft.load_adapter(model.cfg, base, where)


def test_bad_prompt_tensor_is_refused(loaded, tmp_path):
    _, model, base, _ = loaded("gpt2")
    params = peft.build_method(METHODS["prompt_tuning"]).apply(base, jax.random.key(0))
    config, tensors = prompt_format.adapter_state(model.cfg, params)
    where = _write(tmp_path, {**config, "num_virtual_tokens": N + 1}, tensors)
    with pytest.raises(peft.AdapterFormatError, match="prompt_embeddings has shape"):
        peft.load_adapter(model.cfg, base, where)


def test_allow_lists_cover_every_peft_config_field():
    import dataclasses

    for cls, fields in (
        (torch_peft.PromptTuningConfig, prompt_format.PROMPT_FIELDS),
        (torch_peft.PrefixTuningConfig, prompt_format.PREFIX_FIELDS),
    ):
        assert {f.name for f in dataclasses.fields(cls)} == set(fields), cls.__name__


def test_merged_checkpoints_are_refused(loaded, tmp_path):
    _, model, base, _ = loaded("llama")
    params = peft.build_method(METHODS["prompt_tuning"]).apply(base, jax.random.key(0))
    with pytest.raises(ModelError, match="virtual_tokens.*cannot be merged"):
        save_pretrained(model, peft.merge(params), str(tmp_path))
