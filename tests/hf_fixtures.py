"""Helpers shared by the tests (plain functions; nothing is downloaded).

- `save_tiny(family, tmp_path)` returns the directory of a random Hugging Face
  checkpoint written with `transformers`' own `save_pretrained`, so loading it
  goes through exactly the path a downloaded checkpoint takes; `build_tiny`
  returns the PyTorch model, `torch_base` loads one, `torch_logits` runs it.
- `tiny_model(model_type)` is a random ftjax model and its params, drawn with
  numpy rather than `model.init`: compiling the init's random-number programs
  costs seconds on a CPU, the numpy draw milliseconds.
- `log_probs64(model, params, ids)`: float64 reference log-probabilities.
- `LowRankLeaf` / `low_rank_adapt`: a minimal weight leaf `w + a @ b` written
  here (not ftjax.peft's), for code that must accept any weight leaf.
- `build_tiny_encoder(kind, task)` / `save_tiny_encoder`: the same for BERT
  and RoBERTa with a classification head; `encoder_batch` gives padded ids
  with token types and `torch_encoder_outputs` runs the PyTorch encoder.
- `char_tokenizer()` is a fast tokenizer with one token per character over the
  same `VOCAB` ids.
- `run_script(name, *args)` runs `scripts/<name>` in a subprocess as a user
  would (one CPU device); `assert_one_error_line` checks a refused command.
- `write_jsonl(path, rows)` writes a JSON-lines data file.

The shared fixtures (`tok`, the synthetic suite's character tokenizer, and
`tiny_checkpoint(family)`, a `save_tiny` directory per session) are in conftest.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from ftjax.models import ModelConfig, build_model, from_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 97  # <eos> + 95 printable ASCII characters + newline (char_tokenizer)

# The fields every tiny checkpoint shares (a family's own fields added per entry).
TINY_HF_FIELDS = dict(
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
    "llama2": lambda: transformers.LlamaConfig(**{**TINY_HF_FIELDS, "num_key_value_heads": 4}),
    "llama3": lambda: transformers.LlamaConfig(
        **TINY_HF_FIELDS,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama_tied": lambda: transformers.LlamaConfig(**TINY_HF_FIELDS, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**TINY_HF_FIELDS, sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(**TINY_HF_FIELDS, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**TINY_HF_FIELDS, head_dim=16),
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


# Encoders (BERT, RoBERTa): the architectures `save_tiny_encoder` writes.
ENCODER_HEADS = {
    "": "Model",
    "sequence_classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification",
}


def build_tiny_encoder(kind: str, task: str = "", num_labels: int = 3, seed: int = 0):
    """A random `transformers` BERT or RoBERTa (`kind`) with the head of
    `task`, in eval mode. Biases and LayerNorms are perturbed and the head
    scaled up, so that parity checks exercise them and logits are O(1)."""
    prefix = {"bert": "Bert", "roberta": "Roberta"}[kind]
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64 if kind == "bert" else 66,
        type_vocab_size=2,
        num_labels=num_labels,
        pad_token_id=1 if kind == "roberta" else 0,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, prefix + ENCODER_HEADS[task])(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.startswith("classifier") and name.endswith("weight"):
                p.mul_(25.0)
    return model.eval()


def save_tiny_encoder(kind: str, out_dir, task: str = "", num_labels: int = 3, seed: int = 0):
    build_tiny_encoder(kind, task, num_labels, seed).save_pretrained(str(out_dir))
    return str(out_dir)


def encoder_batch(kind: str, batch: int = 3, seq: int = 11, seed: int = 0):
    """(input_ids, attention_mask, token_type_ids) with right padding in rows
    after the first (the pad id of `kind`) and a second segment in each row."""
    rng = np.random.default_rng(seed)
    pad = 1 if kind == "roberta" else 0
    ids = rng.integers(2, VOCAB, (batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    for r in range(1, batch):
        mask[r, seq - 2 * r :] = 0
    ids[mask == 0] = pad
    types = (np.arange(seq)[None, :] >= seq // 2).astype(np.int32) * mask
    return ids, mask, types


def torch_encoder_outputs(model, ids, mask, types) -> np.ndarray:
    """Hidden states (bare model) or logits of a `transformers` encoder."""
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().numpy()


def save_tiny(family: str, out_dir, seed: int = 0) -> str:
    model = build_tiny(family, seed)
    model.save_pretrained(str(out_dir))
    return str(out_dir)


def torch_base(path):
    """The float32 PyTorch model of the checkpoint at `path`, in eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def torch_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None):
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask)
        out = model(torch.tensor(input_ids), **kwargs)
    return out.logits.float().numpy()


def random_params(model, seed: int = 0, logit_scale: float = 40.0):
    """Random params of `model`'s shapes: norm scales near 1, small biases, and
    weights of std 0.02, except the embedding and output head, scaled up so
    that the logits are spread (greedy choices not decided by rounding)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 4), np.int32))["params"]

    def draw(path, spec):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        noise = rng.normal(0.0, 1.0, spec.shape).astype(np.float32)
        if name.endswith("scale"):
            return 1.0 + 0.1 * noise
        if name.endswith("bias"):
            return 0.1 * noise
        std = 0.02 * (logit_scale if any(s in name for s in ("embed", "wte", "lm_head")) else 1)
        return std * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def tiny_model(model_type: str = "llama", scan: bool = False, seed: int = 0, max_len: int = 64):
    """(model, params) of a 2-layer random ftjax model over the character vocabulary."""
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2 if model_type == "llama" else 4,
        max_position_embeddings=max_len,
        scan_layers=scan,
    )
    model = build_model(cfg)
    return model, random_params(model, seed)


@jax.tree_util.register_pytree_node_class
class LowRankLeaf:
    """A minimal weight leaf (w + a @ b), standing in for ftjax.peft's LoRA."""

    def __init__(self, w, a, b):
        self.w, self.a, self.b = w, a, b

    def apply_linear(self, x, *, dtype, rng):
        return x @ self.w.astype(dtype) + (x @ self.a.astype(dtype)) @ self.b.astype(dtype)

    def materialize(self, dtype=None):
        out = self.w + self.a @ self.b
        return out if dtype is None else out.astype(dtype)

    def tree_flatten(self):
        return (self.w, self.a, self.b), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


def low_rank_adapt(params, rank, seed=0, targets=("q_proj", "v_proj"), a_std=1.0, b_std=0.05):
    """`params` with each kernel whose path names one of `targets` replaced by
    a `LowRankLeaf` with random float32 factors."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        if not any(t in str(path) for t in targets):
            return x
        a = rng.normal(0, a_std, (x.shape[0], rank)).astype(np.float32)
        b = rng.normal(0, b_std, (rank, x.shape[1])).astype(np.float32)
        return LowRankLeaf(x, a, b)

    return jax.tree_util.tree_map_with_path(leaf, params)


_forward = jax.jit(
    lambda model, params, ids: model.apply({"params": params}, ids), static_argnums=0
)


def log_probs64(model, params, ids, width: int = 64) -> np.ndarray:
    """float64 log-probabilities `(len(ids), vocab)` of a full forward pass over
    one sequence: an independent reference for the scoring code. The sequence
    is right-padded to `width` (invisible to causal attention), so that one
    program compiles."""
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(ids)] = ids
    logits = np.asarray(_forward(model, params, padded), np.float64)[0, : len(ids)]
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def char_tokenizer():
    """A Hugging Face fast tokenizer with one token per character; id 0 is
    <eos> (also the pad token), no BOS."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>"
    )


def write_jsonl(path, rows) -> str:
    """Writes `rows` (dicts) as JSON lines to `path`; returns it as a string."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def script_env(**extra) -> dict:
    """The environment of a user's run: without the tests' eight simulated
    devices (one CPU device, so runs in different processes are bit-exact)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, **extra}


def script_cmd(name: str, *args) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "scripts", name), *map(str, args)]


# libtpu, for the tests that compile for a Cloud TPU slice with no TPU
# attached: installed by .ci/run into <repo>/.tpu-site (README, "Running on
# Cloud TPU"), seen only by those tests' subprocesses, so that ordinary tests
# never load it.
LIBTPU_SITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".tpu-site")


def libtpu_env() -> dict | None:
    """Environment for a subprocess that can compile for TPU, or None where
    libtpu is neither installed nor in .tpu-site."""
    import importlib.util

    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the simulated CPU devices of conftest are not wanted there
    if importlib.util.find_spec("libtpu") is not None:
        return _tpu_compile_env(env)
    if not os.path.isdir(os.path.join(LIBTPU_SITE, "libtpu")):
        return None
    env["PYTHONPATH"] = os.pathsep.join(p for p in (LIBTPU_SITE, env.get("PYTHONPATH")) if p)
    return _tpu_compile_env(env)


def _tpu_compile_env(env: dict) -> dict:
    # Two test processes may load libtpu at once. (Its start-up noise on a
    # machine without a TPU is ftjax's to silence, at import: not done here,
    # so that the tests see whether it does.)
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    return env


def run_script(name: str, *args, check: bool = False, timeout: float = 600, env=None, cwd=None):
    """`scripts/<name> args...` to completion (`env`: extra variables); with
    `check`, a non-zero exit fails the test with the script's output."""
    proc = subprocess.run(
        script_cmd(name, *args),
        env=script_env(**(env or {})),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def assert_one_error_line(proc, *fragments) -> str:
    """The process was refused as a user error: exit status 2, no traceback,
    and a last line `error: ...` holding every fragment. Returns that line."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


@contextlib.contextmanager
def doc_module(path: str, heading: str, name: str):
    """The python block of `doc_block(path, heading)` executed as a module
    `name` of its own (registered in sys.modules while the context lasts, so
    that dataclasses and pickling see a real module)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(doc_block(path, heading), path, "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules[name]


def attention_f64(q, k, v, mask, scale):
    """Reference attention in float64 numpy: q (B,T,N,H), k/v (B,S,K,H) with
    N a multiple of K (grouped-query), boolean mask (B,1,T,S)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    s = np.where(mask, s, -np.inf)
    with np.errstate(invalid="ignore"):  # rows that see no key: NaN, never compared
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def doc_block(path: str, heading: str) -> str:
    """The one python block of a docs page's section `## <heading>`: the doc
    tests run exactly what the page shows."""
    with open(path, encoding="utf-8") as f:
        section = f.read().split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"{path} '{heading}' must hold exactly one python block"
    return blocks[0]


def checkpoint_loader(tiny_checkpoint, ids, rename=None):
    """`get(family)` -> (checkpoint dir, ftjax model, base params, jitted
    logits on `ids`), loaded once per family (`rename` maps a test's family
    names to `tiny_checkpoint`'s); the `loaded` fixture of the PEFT-format tests."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tiny_checkpoint((rename or {}).get(family, family))
            model, params = from_pretrained(path)
            logits = jax.jit(lambda p, m=model: m.apply({"params": p}, ids))
            cache[family] = (path, model, params, logits)
        return cache[family]

    return get
