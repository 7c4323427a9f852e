"""Evaluate a run's latest or best checkpoint (or its base model) and write
eval.json: loss, perplexity, token accuracy and exact match on every eval set,
before/after comparison (forgetting) and the weight analysis.

    python scripts/evaluate.py --workdir=runs/forgetting/method=lora,rank=16,seed=0
    python scripts/evaluate.py --workdir=RUN --checkpoint=best
    python scripts/evaluate.py --workdir=RUN --base_only     # the model before fine-tuning
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _cli import parse_flags, run_main  # noqa: E402
from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (holds config.json, checkpoints/).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
_BASE_ONLY = flags.DEFINE_bool("base_only", False, "Evaluate the base model, not the checkpoint.")
_OUT = flags.DEFINE_string("out", "", "Output file (default <workdir>/eval.json).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from ftjax.data import build_pipeline
    from ftjax.study import RunDir, default_eval_config, evaluate_run, write_json_atomic
    from ftjax.train.loop import RunResult
    from ftjax.train.restore import load_base_model, load_run_config, restore_run

    cfg = load_run_config(_WORKDIR.value)
    if "eval" not in cfg:
        cfg.eval = default_eval_config()
    if _BASE_ONLY.value:  # the base comes from the config: no checkpoint needed
        model, base = load_base_model(cfg)
        params, step = base, None
        cfg.eval.analysis = False
    else:
        model, params, base, step = restore_run(cfg, _WORKDIR.value, _CHECKPOINT.value)
    pipeline = build_pipeline(cfg.data)
    out_dir = os.path.dirname(_OUT.value) if _OUT.value else _WORKDIR.value
    result = RunResult({"checkpoint_step": step}, model, params, base, pipeline)
    metrics = evaluate_run(result, cfg, out_dir or ".", update_summary=False,
                           extra={"checkpoint_step": step})  # fmt: skip
    path = _OUT.value or RunDir(_WORKDIR.value).file("eval.json")
    if os.path.basename(path) != "eval.json":  # evaluate_run wrote <out_dir>/eval.json
        write_json_atomic(path, metrics)
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and "/" in k}
    print(json.dumps(shown, indent=1))
    print(f"eval: {path}")


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
