"""Before/after lm-evaluation-harness scores of a sweep's runs: learning on
target tasks (e.g. gsm8k) and forgetting on general multiple-choice tasks
(e.g. hellaswag, arc_challenge, winogrande), through `ftjax.eval.lm_eval_adapter`.

It reads only what runs write: each run directory's config.json (the base
checkpoint, tokenizer and the `eval.harness` section), summary.json and the
tuned weights (`adapter/` for LoRA/QLoRA, `hf/` for full fine-tuning). The
scores are merged into each summary.json, so `scripts/report.py` tabulates them:

    python experiments/llm/harness.py --workdir=runs/llfl
    python scripts/report.py --workdir=runs/llfl --target=harness_target \
        --general=harness_general --metric=score

Keys written: `base/<task>/<metric>`, `final/<task>/<metric>`,
`forgetting/<task>/<metric>_drop` (base minus final; `<metric>_increase`,
final minus base, for perplexity-like metrics; none for a metric whose
direction `ftjax.eval.forgetting` does not know), and per group
(`harness_target`, `harness_general`) the mean of each task's main metric as
`base/<group>/score`, `final/<group>/score`, `forgetting/<group>/score_drop`.
The base model is scored once per sweep (cached in the sweep directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys

from ftjax.errors import ConfigError, FtjaxError, RunDirError

# A task's main metric: the first of these it reports.
PRIMARY = ("acc_norm", "acc", "exact_match_strict-match", "exact_match_flexible-extract",
           "exact_match")  # fmt: skip


def _tasks(value) -> list[str]:
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return list(value or [])


def harness_scores(model, params, tokenizer, tasks, hcfg) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from `lm_eval.simple_evaluate` on in-memory
    params (plain or adapter leaves). Metric names drop the harness's ",none"
    filter suffix; other filters are appended (`exact_match_strict-match`)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ftjax.eval.lm_eval_adapter import FtjaxLM

    lm = FtjaxLM(model=model, params=params, tokenizer=tokenizer,
                 batch_size=int(hcfg.get("batch_size", 8)))  # fmt: skip
    manager = TaskManager(
        include_path=hcfg.get("include_path") or None,
        include_defaults=bool(hcfg.get("include_defaults", True)),
    )
    fewshot = int(hcfg.get("num_fewshot", -1))
    out = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=None if fewshot < 0 else fewshot,
        limit=int(hcfg.get("limit", 0)) or None,
        task_manager=manager,
        bootstrap_iters=0,  # no stderr resampling: minutes on large tasks, unused here
        log_samples=False,
    )
    scores = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
        scores[task] = row
    return scores


def primary(row: dict) -> float | None:
    return next((row[m] for m in PRIMARY if m in row), None)


def forgetting_keys(base: dict, final: dict, target, general) -> dict:
    """Summary keys from base and final harness scores (see the module doc);
    every drop through `ftjax.eval.forgetting.metric_change`."""
    from ftjax.eval.forgetting import metric_change

    out = {}
    for task in sorted(set(base) & set(final)):
        for metric in sorted(set(base[task]) & set(final[task])):
            b, f = base[task][metric], final[task][metric]
            out[f"base/{task}/{metric}"] = b
            out[f"final/{task}/{metric}"] = f
            change = metric_change(metric, b, f)
            if change is not None:  # a metric of unknown direction has no "drop"
                out[f"forgetting/{task}/{change[0]}"] = change[1]
    for group, tasks in (("harness_target", target), ("harness_general", general)):
        pairs = [(primary(base.get(t, {})), primary(final.get(t, {}))) for t in tasks]
        pairs = [p for p in pairs if None not in p]
        if pairs:
            b = statistics.fmean(p[0] for p in pairs)
            f = statistics.fmean(p[1] for p in pairs)
            name, drop = metric_change("score", b, f)
            out.update({f"base/{group}/score": b, f"final/{group}/score": f,
                        f"forgetting/{group}/{name}": drop})  # fmt: skip
    return out


def _base_cache(sweep_dir: str, checkpoint: str, tasks, hcfg) -> str:
    key = json.dumps([checkpoint, sorted(tasks), {k: hcfg.get(k) for k in sorted(hcfg)}],
                     sort_keys=True, default=str)  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(sweep_dir, f"harness_base_{digest}.json")


def evaluate_run_dir(run_dir: str, hcfg: dict | None = None) -> dict:
    """Scores one finished run's base and tuned model; merges the keys into its
    summary.json and returns them. `hcfg` defaults to the run's eval.harness."""
    import transformers

    from ftjax.models import from_pretrained
    from ftjax.peft import load_adapter
    from ftjax.study import RunDir, read_json, write_json_atomic

    run = RunDir(run_dir)
    cfg = run.read_config().to_dict()
    hcfg = dict(hcfg or cfg.get("eval", {}).get("harness", {}))
    target, general = _tasks(hcfg.get("target_tasks")), _tasks(hcfg.get("general_tasks"))
    if not target and not general:
        raise ConfigError(f"{run_dir}: eval.harness names no target_tasks or general_tasks")
    checkpoint = cfg["model"]["checkpoint"]
    dtype = cfg["model"].get("dtype", "float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg["data"]["tokenizer"] or checkpoint)
    model, base_params = from_pretrained(checkpoint, dtype=dtype)
    cache = _base_cache(os.path.dirname(os.path.abspath(run_dir)), checkpoint, target + general,
                        hcfg)  # fmt: skip
    if os.path.exists(cache):
        base = read_json(cache)
    else:
        base = harness_scores(model, base_params, tokenizer, target + general, hcfg)
        write_json_atomic(cache, base, indent=1)
    if os.path.isdir(os.path.join(run_dir, "adapter")):
        tuned = load_adapter(model.cfg, base_params, os.path.join(run_dir, "adapter"))
    elif os.path.isdir(os.path.join(run_dir, "hf")):
        _, tuned = from_pretrained(os.path.join(run_dir, "hf"), dtype=dtype)
    else:
        raise RunDirError(
            f"{run_dir}: no adapter/ or hf/ to evaluate; train with export_adapter or export_hf"
        )
    out = forgetting_keys(base, harness_scores(model, tuned, tokenizer, target + general, hcfg),
                          target, general)  # fmt: skip
    run.update_summary(out)
    run.write_json("harness.json", out)  # last: its presence marks the run as scored
    return out


def evaluate_sweep(workdir: str) -> list[str]:
    """Every completed, not yet scored run of the sweep (the runs the report
    reads); returns their names."""
    from ftjax.study import RunDir, load_runs

    done = []
    for run in load_runs(workdir):
        if not RunDir(run["dir"]).has("harness.json"):
            evaluate_run_dir(run["dir"])
            done.append(run["name"])
    return done


def main(argv: list[str]) -> int:
    workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None)
    if not workdir:
        print("error: --workdir=SWEEP_DIR is required", file=sys.stderr)
        return 2
    try:
        for name in evaluate_sweep(workdir):
            print(f"harness scores merged into {os.path.join(workdir, name, 'summary.json')}")
    except FtjaxError as e:  # bad input; anything else is a bug and keeps its traceback
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
