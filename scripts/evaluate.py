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
    from ftjax.study.checkpoints import evaluate_checkpoint

    metrics, path = evaluate_checkpoint(
        _WORKDIR.value, _CHECKPOINT.value, base_only=_BASE_ONLY.value, out=_OUT.value
    )
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and "/" in k}
    print(json.dumps(shown, indent=1))
    print(f"eval: {path}")


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
