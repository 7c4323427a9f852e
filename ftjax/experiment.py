"""What experiment files share: the `arg` switch that rewrites a config for a
method in one place, the cached synthetic suite and the suite studies' common
config. The evaluation a study runs after training lives in
`ftjax.study.evaluate`.

>>> arg = parse_arg("method=lora,rank=16,targets=all-linear")
>>> cfg = with_method(default_config(), arg.pop("method"), arg)
>>> cfg.method.name, cfg.method.rank, cfg.method.targets
('lora', 16, 'all-linear')
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import ml_collections

from ftjax.errors import ConfigError
from ftjax.rundir import make_dirs
from ftjax.study.evaluate import (
    default_eval_config,
    # Transitional: scripts/sweep.py and scripts/evaluate.py still import it from
    # here; it belongs to `ftjax.study.evaluate` (remove once they import it there).
    evaluate_run,  # noqa: F401
)
from ftjax.train import default_config


def parse_arg(arg: str | None) -> dict[str, str]:
    """ "method=lora,rank=16" -> {"method": "lora", "rank": "16"}."""
    out = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ConfigError(f"config arg {part!r}: expected key=value pairs separated by commas")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def with_method(cfg: ml_collections.ConfigDict, name: str, options: dict | None = None):
    """Rewrites every field a method touches: the method section (the study
    preset of `name` in the method registry, then `options`) and the learning
    rate (PEFT methods train at a higher lr, as in their papers). The method
    config is validated here, before any model or data is loaded."""
    from ftjax.peft import registry

    preset = registry.preset(name)
    method = {
        "name": preset.method,
        **preset.options,
        **registry.parse_options(preset.method, options or {}),
    }
    registry.resolve_config(method)
    cfg.method = ml_collections.ConfigDict(method)
    cfg.optim.lr = float(cfg.optim.lr) * preset.lr_scale
    return cfg


def split_method_options(args: dict) -> tuple[dict, dict]:
    """(method options, remaining args) of a parsed `arg`: a key is a method
    option when some registered method has an option of that name (the chosen
    method then checks it is one of its own)."""
    from ftjax.peft import registry

    names = {o for m in registry.known_methods() for o in registry.get(m).options}
    method = {k: v for k, v in args.items() if k in names}
    rest = {k: v for k, v in args.items() if k not in names}
    return method, rest


def cache_dir() -> str:
    return os.environ.get("FTJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ftjax"))


def ensure_suite(
    seed: int = 0, label_noise: float = 0.0, root: str | None = None, **sizes
) -> tuple[dict, str]:
    """The synthetic suite and its tokenizer, written once per (seed, sizes,
    noise) into the cache and reused; built in a temporary directory and
    renamed, so concurrent or interrupted builds never leave a partial suite."""
    from ftjax.data import build_char_tokenizer, write_suite

    key = "-".join(
        [f"seed{seed}", f"noise{label_noise:g}"] + [f"{k}{v}" for k, v in sorted(sizes.items())]
    )
    final = os.path.join(root or cache_dir(), "suites", key)
    if not os.path.exists(os.path.join(final, "done")):
        make_dirs(os.path.dirname(final), "the suite cache (FTJAX_CACHE)")
        tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".tmp-")
        write_suite(tmp, seed, label_noise=label_noise, **sizes)
        build_char_tokenizer(os.path.join(tmp, "tokenizer"))
        open(os.path.join(tmp, "done"), "w").close()
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(final, "manifest.json")) as f:
        files = json.load(f)["files"]
    paths = {k: os.path.join(final, v) for k, v in files.items()}
    paths["manifest"] = os.path.join(final, "manifest.json")
    return paths, os.path.join(final, "tokenizer")


def ensure_sentence_task(seed: int, train: int, eval_: int, val: int, probe_pairs: int,
                         root: str | None = None) -> dict[str, str]:  # fmt: skip
    """The generated negation task (train/eval JSON lines) and paraphrase probe
    (`ftjax.data.sentences`), written once per (seed, sizes) into the cache,
    atomically as `ensure_suite`'s."""
    from ftjax.data import sentences

    key = f"seed{seed}-train{train}-eval{eval_}-val{val}-probe{probe_pairs}"
    final = os.path.join(root or cache_dir(), "sentences", key)
    if not os.path.exists(os.path.join(final, "done")):
        make_dirs(os.path.dirname(final), "the data cache (FTJAX_CACHE)")
        tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".tmp-")
        sentences.write_negation_task(tmp, seed, train, eval_, val)
        sentences.write_paraphrase_probe(os.path.join(tmp, "probe.json"), probe_pairs, seed)
        open(os.path.join(tmp, "done"), "w").close()
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "train": os.path.join(final, "negation_train.jsonl"),
        "eval": os.path.join(final, "negation_eval.jsonl"),
        "val": os.path.join(final, "negation_val.jsonl"),
        "probe": os.path.join(final, "probe.json"),
    }


# ----------------------------------------------------------------------------- suite studies


def suite_study_config(model: dict) -> ml_collections.ConfigDict:
    """The starting point of a study on the synthetic suite: a from-scratch
    Llama-architecture model over the suite's 128-symbol tokenizer, AdamW with
    a cosine schedule, and the default evaluation."""
    cfg = default_config()
    cfg.model.init.update(vocab_size=128, max_position_embeddings=128, **model)
    cfg.optim.update(lr=3e-4, warmup_steps=20, schedule="cosine", weight_decay=0.01, clip_norm=1.0)
    cfg.eval = default_eval_config()
    return cfg


def pretrain_on_general(cfg, paths: dict, tokenizer: str, steps: int, max_warmup: int):
    """Makes `cfg` the stage that builds a study's base model: full training
    from scratch on the suite's general tasks only; the target task stays
    eval-only (the base must not know it). Exports HF weights for the
    fine-tuning runs to load."""
    from ftjax.data import suite_data_config

    cfg.data = suite_data_config(paths, tokenizer, general_weight=1.0, target_weight=0.0)
    cfg.optim.update(lr=3e-3, warmup_steps=min(max_warmup, steps // 4))
    cfg.train.steps = steps
    cfg.train.export_hf = True
    cfg.eval.analysis = False
    with_method(cfg, "full")
    return cfg


def seed_everything(cfg, value: str) -> None:
    """`seed=N` in a study's arg: the model-side randomness (adapter init,
    dropout) and the data order together. Seeding only the former would leave
    full fine-tuning's seeds identical, and its spread over seeds a false 0."""
    try:
        seed = int(value)
    except ValueError:
        raise ConfigError(f"config arg seed={value!r}; expected an int") from None
    cfg.train.seed = seed
    cfg.data.seed = seed
