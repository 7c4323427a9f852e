"""A study run's evaluation after training: the base and the fine-tuned model
on every eval set, forgetting, memorization of corrupted labels and the
weight analysis, merged into the run's summary.json and written to eval.json.

Each number comes from one function of `ftjax.eval` (or `ftjax.analysis`):

    base|final/<set>/loss, token_accuracy   ftjax.eval.metrics.evaluate_batches
                                            (final: the training loop's last
                                            evaluation when the caller passes it)
    base|final/<set>/exact_match            ftjax.eval.scoring.exact_match_on
    forgetting/<set>/<metric>_drop|_increase ftjax.eval.forgetting.forgetting
    extra/memorized_wrong, extra/corrupted_recovered   ftjax.eval.scoring.exact_match_on
    analysis/*                              ftjax.analysis.analyze_update
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import jax
import ml_collections

from ftjax.errors import ConfigError
from ftjax.eval.classification import evaluate_classifier
from ftjax.eval.embeddings import probe_scores, probe_texts, sentence_embeddings, similarity_kept
from ftjax.eval.forgetting import forgetting
from ftjax.eval.metrics import (
    METRIC_KEYS,
    SUMMARY_NAMES,
    evaluate_batches,
    flatten_sets,
    unflatten_sets,
)
from ftjax.eval.scoring import exact_match_on, strip_whitespace
from ftjax.rundir import EVALUATED, RunDir, read_json, write_json_atomic

# The synthetic suite's answers are exact strings (case and punctuation
# count): only surrounding whitespace is ignored.
ANSWER_NORMALIZER = strip_whitespace


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
            # Exact match along training, at every `train.eval_every` steps, on
            # the first `curve_examples` prompts of each eval set (0: none).
            curve_examples=0,
            # A JSON file {"pairs": [[sentence, paraphrase], ...]} (an encoder's
            # sentence-embedding probe, ftjax.eval.embeddings): scored as the
            # eval set `embedding` (accuracy = paraphrase retrieval), "" : none.
            embedding_probe="",
        )
    )


# Eval-section entries that the study layer does not read but a study's own
# code does (experiments/llm/harness.py: the lm-eval tasks).
EXTRA_EVAL_FIELDS = ("harness",)


def validate_eval_config(ecfg) -> None:
    """Names, types and ranges of the eval section; a ConfigError naming
    `eval.<field>` on the first bad one."""
    from ftjax.train.config import check_fields

    defaults = default_eval_config()
    check_fields("eval", ecfg, defaults, skip=EXTRA_EVAL_FIELDS)  # names and types
    # ranges: counts >= 1 (max_examples 0: all; curve_examples 0: none), eps > 0
    for key, value in ecfg.items():
        default = defaults.get(key)
        if key in EXTRA_EVAL_FIELDS or isinstance(default, (bool, str)):
            continue
        if isinstance(default, int):
            lo = 0 if key in ("max_examples", "curve_examples") else 1
            if value < lo:
                raise ConfigError(f"eval.{key}={value!r}; expected an integer >= {lo}")
        elif value <= 0:
            raise ConfigError(f"eval.{key}={value!r}; expected a positive number")


def training_eval_sets(summary: Mapping, cfg) -> dict[str, dict] | None:
    """The training loop's final evaluation per eval set, read from its
    summary (`eval/<set>/loss`, `eval/<set>/token_accuracy`), when it covered
    the whole eval sets (`train.eval_max_batches` 0); else None. What
    `evaluate_run(final_sets=...)` takes so as not to compute them again."""
    if int(cfg.get("train", {}).get("eval_max_batches", 0) or 0):
        return None
    return unflatten_sets(summary, "eval") or None


def curve_evaluator(cfg):
    """The study's `curve` for `ftjax.train.train` (see there): exact match
    on the first `eval.curve_examples` prompts of every eval set, recorded as
    `curve/<set>/exact_match`; None when the config asks for no curve. One
    compiled generation program per eval set (the prompts, so their width,
    stay the same at every evaluation)."""
    ecfg = cfg.get("eval", default_eval_config())
    n = int(ecfg.get("curve_examples", 0) or 0)
    if not n or not ecfg.exact_match or not int(cfg.train.eval_every or 0):
        return None

    def factory(model, pipe):
        subsets = {}
        for name in pipe.eval_names:
            rows = pipe.eval_rows(name)
            rows = rows.select(range(min(len(rows), n)))
            subsets[name] = (list(rows["prompt"]), list(rows["answer"]))

        def measure(step, params):
            from ftjax import peft

            merged = peft.merge(params)
            return {
                f"curve/{name}/exact_match": exact_match_on(
                    model,
                    merged,
                    pipe.tokenizer,
                    prompts,
                    answers,
                    max_new_tokens=ecfg.max_new_tokens,
                    batch_size=ecfg.batch_size,
                    add_bos=bool(cfg.data.add_bos),
                    normalizer=ANSWER_NORMALIZER,
                )  # fmt: skip
                for name, (prompts, answers) in subsets.items()
            }

        return measure

    return factory


def _base_eval_cache_path(cfg, ecfg) -> str | None:
    """Every fine-tuning run of a study starts from the same base and measures
    it on the same eval sets: the "before" numbers are computed once, stored
    beside the base checkpoint under a digest of what determines them."""
    ckpt = cfg.model.checkpoint
    if not ckpt or not os.path.isdir(ckpt) or not os.access(ckpt, os.W_OK):
        return None
    if cfg.model.get("task"):  # a head drawn from each run's seed: no shared "before"
        return None
    from ftjax.train.checkpoint import checksum_files

    weights = [os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors")]
    key = json.dumps(
        [checksum_files(weights), cfg.data.to_dict(), ecfg.to_dict(), cfg.model.dtype],
        sort_keys=True, default=str,
    )  # fmt: skip
    return os.path.join(ckpt, f"base_eval-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json")


def _measure(model, params, pipe, cfg, ecfg, known: Mapping | None = None,
             embeddings_out: list | None = None) -> dict:  # fmt: skip
    """{set: {loss, accuracy[, exact_match]}} of `params` on the run's eval
    sets; loss and accuracy taken from `known` for the sets it has."""
    out = {}
    labeled = getattr(pipe, "kind", "") == "classification"
    for name in pipe.eval_names:
        if known and name in known and {"loss", "accuracy"} <= set(known[name]):
            m = {k: float(v) for k, v in known[name].items() if k in SUMMARY_NAMES}
        elif labeled:  # loss and every classification metric from one pass
            scores = evaluate_classifier(model, params, pipe.eval_batches(name),
                                         pipe.eval_labels(name), pipe.label_kind)  # fmt: skip
            m = {METRIC_KEYS[k]: v for k, v in scores.items()}
        else:
            m = evaluate_batches(model, params, pipe.eval_batches(name), name=f"eval set {name!r}")
            m = {"loss": m["loss"], "accuracy": m["accuracy"]}
        if ecfg.exact_match and getattr(pipe, "kind", "") != "classification":
            rows = pipe.eval_rows(name)
            rows = rows.select(range(min(len(rows), ecfg.max_examples or len(rows))))
            m["exact_match"] = exact_match_on(
                model, params, pipe.tokenizer, rows["prompt"], rows["answer"],
                max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size,
                add_bos=bool(cfg.data.add_bos), normalizer=ANSWER_NORMALIZER,
            )  # fmt: skip
        out[name] = m
    if ecfg.get("embedding_probe"):
        emb = sentence_embeddings(model, params, pipe.tokenizer, probe_texts(probe_pairs(ecfg)))
        out[EMBEDDING_SET] = {METRIC_KEYS[k]: v for k, v in probe_scores(emb).items()}
        if embeddings_out is not None:
            embeddings_out.append(emb)
    return out


EMBEDDING_SET = "embedding"


def probe_pairs(ecfg) -> list:
    path = ecfg.embedding_probe
    try:
        pairs = read_json(path)["pairs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"eval.embedding_probe={path!r}: expected a JSON file {{'pairs': [[a, b], ...]}} ({e})"
        ) from None
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)
               for p in pairs):  # fmt: skip
        raise ConfigError(f"eval.embedding_probe={path!r}: every pair must be two strings")
    return pairs


def evaluate_run(
    result,
    cfg,
    run_dir: str,
    update_summary: bool = True,
    *,
    final_sets: Mapping | None = None,
    extra: Mapping | None = None,
) -> dict:
    """Before/after metrics on every eval set, forgetting, memorization and
    weight analysis of a trained run (`result`: the `RunResult` of
    `ftjax.train.train`); merged into the run's summary.json (with
    `evaluated: true`) unless `update_summary` is False, and written to
    eval.json. Returns the new summary fields.

    `final_sets` ({set: {"loss", "accuracy", ...}}, as `training_eval_sets`
    or `ftjax.eval.evaluate_sets` give it) is the fine-tuned model's loss and
    token accuracy already measured (by the training loop's last evaluation):
    those sets are not run through the model again. `extra` fields (e.g.
    the evaluated checkpoint's step) are stored and returned with the metrics.
    """
    from ftjax import peft

    ecfg = cfg.get("eval", default_eval_config())
    pipe, model = result.pipeline, result.model
    tuned = peft.merge(result.params)
    base = result.base_params

    out: dict = dict(extra or {})
    probe: list = []  # the probe's embeddings, base then tuned (when measured here)
    cache = _base_eval_cache_path(cfg, ecfg)
    if cache and os.path.exists(cache):
        out.update(read_json(cache))
    else:
        measured = flatten_sets(
            _measure(model, base, pipe, cfg, ecfg, embeddings_out=probe), "base"
        )
        out.update(measured)
        if cache:
            write_json_atomic(cache, measured, indent=1)
    final = _measure(model, tuned, pipe, cfg, ecfg, known=final_sets, embeddings_out=probe)
    out.update(flatten_sets(final, "final"))
    sets = list(pipe.eval_names) + ([EMBEDDING_SET] if ecfg.get("embedding_probe") else [])
    if ecfg.get("embedding_probe"):
        if len(probe) < 2:  # the base's came from the cache
            texts = probe_texts(probe_pairs(ecfg))
            probe.insert(0, sentence_embeddings(model, base, pipe.tokenizer, texts))
        out[f"final/{EMBEDDING_SET}/similarity_kept"] = similarity_kept(probe[0], probe[-1])
    if sets:
        before, after = _summary_named(out, "base"), _summary_named(out, "final")
        changes = forgetting(before, after, sets=sets)
        for name in sets:
            for key, value in changes[name].items():
                if not key.endswith(("_before", "_after")):
                    out[f"forgetting/{name}/{key}"] = value
    if ecfg.memorization:
        out.update(memorization(model, tuned, pipe.tokenizer, cfg, ecfg))
    run = RunDir(run_dir)
    is_main = jax.process_index() == 0
    if ecfg.analysis:
        from ftjax.analysis import analyze_update

        try:
            report = analyze_update(base, tuned, k=ecfg.intruder_k, eps=ecfg.intruder_eps)
            agg = report["aggregate"].get("all")
            if agg:
                out["analysis/energy_rank_90"] = agg["mean_energy_rank"]
                out["analysis/intruders"] = agg["mean_intruders"]
                out["analysis/relative_update_norm"] = agg["mean_relative_norm"]
            if is_main:
                run.write_json("weight_analysis.json", report, indent=None)
        except ValueError as e:  # e.g. nothing changed (a 0-step run)
            out["analysis/error"] = str(e)
    study = cfg.get("study", {})
    for key in ("variant", "label"):  # how the report names and groups this run
        if study.get(key):
            out[key] = study.get(key)
    result.summary.update(out)
    if update_summary:
        result.summary[EVALUATED] = True
    if is_main:
        run.write_eval(out)
        if update_summary:
            # One write holds the metrics and the mark that the run is evaluated.
            run.update_summary(result.summary)
    return out


def _summary_named(flat: Mapping, prefix: str) -> dict[str, dict[str, float]]:
    """{set: {summary metric name: value}} of the `<prefix>/<set>/...` keys, so
    that forgetting's change names match the summary's (`token_accuracy_drop`)."""
    return {
        name: {SUMMARY_NAMES[m]: v for m, v in metrics.items()}
        for name, metrics in unflatten_sets(flat, prefix).items()
    }


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

    def share(answers):
        return exact_match_on(
            model, params, tokenizer, prompts, answers,
            max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size,
            add_bos=bool(cfg.data.add_bos), normalizer=ANSWER_NORMALIZER,
        )  # fmt: skip

    return {
        "extra/memorized_wrong": share([c["wrong"] for c in corrupted]),
        "extra/corrupted_recovered": share([c["answer"] for c in corrupted]),
    }
