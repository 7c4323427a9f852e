"""What experiment files share: the `arg` switch that rewrites a config for a
method in one place, the cached synthetic suite, and the evaluation a study
runs after training (before/after metrics, forgetting, weight analysis).

>>> cfg = with_method(default_config(), "method=lora,rank=16,targets=all-linear")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import ml_collections

from ftjax.train import default_config
from ftjax.train.optim import ConfigError

# Per-method defaults that differ from full fine-tuning. Everything else about
# the runs (tokens, steps, schedule) stays matched across an ablation.
METHOD_PRESETS = {
    "full": {"method": {"name": "full"}, "lr_scale": 1.0},
    "lora": {
        "method": {"name": "lora", "rank": 16, "alpha": 32, "targets": "all-linear"},
        "lr_scale": 10.0,
    },
    "dora": {
        "method": {"name": "dora", "rank": 16, "alpha": 32, "targets": "all-linear"},
        "lr_scale": 10.0,
    },
    "qlora": {
        "method": {"name": "qlora", "rank": 16, "alpha": 32, "targets": "all-linear"},
        "lr_scale": 10.0,
    },
    "pissa": {
        "method": {
            "name": "lora",
            "rank": 16,
            "alpha": 16,
            "init": "pissa",
            "targets": "all-linear",
        },
        "lr_scale": 2.0,
    },
    "bitfit": {"method": {"name": "bitfit"}, "lr_scale": 10.0},
    "freeze": {"method": {"name": "freeze", "last_layers": 1}, "lr_scale": 1.0},
}
# Keys of `arg` that are method options (converted to the option's type).
_METHOD_OPTION_TYPES = {
    "rank": int,
    "alpha": float,
    "dropout": float,
    "rslora": lambda s: s.lower() in ("1", "true", "yes"),
    "init": str,
    "targets": str,
    "last_layers": int,
    "trainable": str,
    "compute": str,
}


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
    """Rewrites every field a method touches: the method section and the
    learning rate (PEFT methods train at a higher lr, as in their papers)."""
    if name not in METHOD_PRESETS:
        raise ConfigError(f"method={name!r}; expected one of {', '.join(METHOD_PRESETS)}")
    preset = METHOD_PRESETS[name]
    method = dict(preset["method"])
    for k, v in (options or {}).items():
        if k not in _METHOD_OPTION_TYPES:
            raise ConfigError(
                f"config arg {k}={v!r}: not a method option; options: {', '.join(_METHOD_OPTION_TYPES)}"
            )
        method[k] = _METHOD_OPTION_TYPES[k](v) if isinstance(v, str) else v
    cfg.method = ml_collections.ConfigDict(method)
    cfg.optim.lr = float(cfg.optim.lr) * preset["lr_scale"]
    return cfg


def split_method_options(args: dict) -> tuple[dict, dict]:
    """(method options, remaining args) of a parsed `arg`."""
    method = {k: v for k, v in args.items() if k in _METHOD_OPTION_TYPES}
    rest = {k: v for k, v in args.items() if k not in _METHOD_OPTION_TYPES}
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
        os.makedirs(os.path.dirname(final), exist_ok=True)
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


# ----------------------------------------------------------------------------- evaluation


def default_eval_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            exact_match=True,  # generate answers for each eval set's prompts
            max_examples=200,  # per eval set, for generation
            max_new_tokens=40,
            batch_size=64,
            analysis=True,  # ΔW spectra and intruder dimensions against the base
            intruder_k=10,
            intruder_eps=0.5,
            memorization=False,  # data-quality study: recall of corrupted training labels
        )
    )


def encode_prompts(tokenizer, prompts, add_bos: bool = True) -> list[list[int]]:
    """Prompt token ids exactly as the data pipeline builds them for training
    (BOS added by hand when the tokenizer has one, no EOS): a mismatch here
    would measure the tokenization, not the model."""
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    return [bos + tokenizer.encode(p, add_special_tokens=False) for p in prompts]


def generate_answers(model, params, tokenizer, prompts, ecfg, add_bos: bool = True) -> list[str]:
    """Greedy answers, in batches of `ecfg.batch_size` that all share one
    shape (one prompt width; the last batch filled up with repeats whose
    answers are dropped): one compiled program per eval set, not per batch."""
    from ftjax.eval import generate

    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = encode_prompts(tokenizer, prompts, add_bos)
    if not encoded:
        return []
    width = max(len(p) for p in encoded)
    rows = min(ecfg.batch_size, len(encoded))
    texts = []
    for i in range(0, len(encoded), rows):
        batch = encoded[i : i + rows]
        real = len(batch)
        batch = batch + [batch[0]] * (rows - real)
        out = generate(
            model,
            params,
            batch,
            max_new_tokens=ecfg.max_new_tokens,
            stop_tokens=stop,
            pad_id=pad,
            min_prompt_width=width,
        )
        sequences = out.sequences(strip_stop=True)[:real]
        texts += tokenizer.batch_decode(sequences, skip_special_tokens=True)
    return texts


def exact_match_on(model, params, tokenizer, prompts, answers, ecfg, add_bos: bool = True) -> float:
    """Share of prompts whose greedy answer equals the reference exactly
    (whitespace-stripped; the synthetic tasks are case- and punctuation-exact)."""
    outs = generate_answers(model, params, tokenizer, list(prompts), ecfg, add_bos)
    correct = sum(o.strip() == a.strip() for o, a in zip(outs, answers))
    return correct / max(len(prompts), 1)


def _base_eval_cache_path(cfg, ecfg) -> str | None:
    """Every fine-tuning run of a study starts from the same base and measures
    it on the same eval sets: the "before" numbers are computed once, stored
    beside the base checkpoint under a digest of what determines them."""
    ckpt = cfg.model.checkpoint
    if not ckpt or not os.path.isdir(ckpt) or not os.access(ckpt, os.W_OK):
        return None
    import hashlib

    from ftjax.train.checkpoint import checksum_files

    weights = [os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors")]
    key = json.dumps(
        [checksum_files(weights), cfg.data.to_dict(), ecfg.to_dict(), cfg.model.dtype],
        sort_keys=True, default=str,
    )  # fmt: skip
    return os.path.join(ckpt, f"base_eval-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json")


def _write_json_atomic(path: str, data) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def evaluate_run(result, cfg, workdir: str, update_summary: bool = True) -> dict:
    """Before/after metrics on every eval set, forgetting, and weight analysis;
    merged into summary.json and written to eval.json. Keys as `report.py` reads."""
    from ftjax import peft
    from ftjax.eval import evaluate_sets
    from ftjax.train.loop import write_summary

    ecfg = cfg.get("eval", default_eval_config())
    pipe, model = result.pipeline, result.model
    tuned = peft.merge(result.params)
    base = result.base_params
    sets = {n: list(pipe.eval_batches(n)) for n in pipe.eval_names}

    def measure(side, params):
        out = {}
        for name, m in evaluate_sets(model, params, sets).items():
            out[f"{side}/{name}/loss"] = m["loss"]
            out[f"{side}/{name}/token_accuracy"] = m["accuracy"]
            if ecfg.exact_match:
                rows = pipe.eval_rows(name)
                rows = rows.select(range(min(len(rows), ecfg.max_examples or len(rows))))
                out[f"{side}/{name}/exact_match"] = exact_match_on(
                    model, params, pipe.tokenizer, rows["prompt"], rows["answer"], ecfg,
                    add_bos=bool(cfg.data.add_bos),
                )  # fmt: skip
        return out

    out: dict = {}
    cache = _base_eval_cache_path(cfg, ecfg)
    if cache and os.path.exists(cache):
        with open(cache) as f:
            out.update(json.load(f))
    else:
        out.update(measure("base", base))
        if cache:
            _write_json_atomic(cache, out)
    out.update(measure("final", tuned))
    for name in pipe.eval_names:
        out[f"forgetting/{name}/loss_increase"] = (
            out[f"final/{name}/loss"] - out[f"base/{name}/loss"]
        )
        if ecfg.exact_match:
            out[f"forgetting/{name}/exact_match_drop"] = (
                out[f"base/{name}/exact_match"] - out[f"final/{name}/exact_match"]
            )
    if ecfg.memorization:
        out.update(memorization(model, tuned, pipe.tokenizer, cfg, ecfg))
    if ecfg.analysis:
        from ftjax.analysis import analyze_update

        try:
            report = analyze_update(base, tuned, k=ecfg.intruder_k, eps=ecfg.intruder_eps)
            agg = report["aggregate"].get("all")
            if agg:
                out["analysis/energy_rank_90"] = agg["mean_energy_rank"]
                out["analysis/intruders"] = agg["mean_intruders"]
                out["analysis/relative_update_norm"] = agg["mean_relative_norm"]
            with open(os.path.join(workdir, "weight_analysis.json"), "w") as f:
                json.dump(report, f, default=float)
        except ValueError as e:  # e.g. nothing changed (a 0-step run)
            out["analysis/error"] = str(e)
    study = cfg.get("study", {})
    for key in ("variant", "label"):  # how the report names and groups this run
        if study.get(key):
            out[key] = study.get(key)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(out, f, indent=2, sort_keys=True)
        if update_summary:
            write_summary(workdir, {**result.summary, **out})
        result.summary.update(out)
    return out


def memorization(model, params, tokenizer, cfg, ecfg) -> dict:
    """For label-noise runs: on the corrupted training prompts, how often the
    model now gives the wrong label it was trained on, and how often the true one."""
    manifest = cfg.get("study", {}).get("manifest", "")
    if not manifest or not os.path.exists(manifest):
        return {}
    with open(manifest) as f:
        corrupted = json.load(f).get("corrupted", [])[: ecfg.max_examples]
    if not corrupted:
        return {"extra/memorized_wrong": 0.0, "extra/corrupted_recovered": float("nan")}
    prompts = [c["prompt"] for c in corrupted]
    wrong = exact_match_on(model, params, tokenizer, prompts, [c["wrong"] for c in corrupted], ecfg)
    right = exact_match_on(
        model, params, tokenizer, prompts, [c["answer"] for c in corrupted], ecfg
    )
    return {"extra/memorized_wrong": wrong, "extra/corrupted_recovered": right}
