"""Train (or resume) one run.

    python scripts/train.py --config=experiments/forgetting/finetune.py:method=lora \
        --workdir=runs/lora --config.optim.lr=3e-4

A --workdir that already holds a checkpoint resumes from it. Exits non-zero
with one line on bad input. SIGTERM saves a checkpoint and exits 0 (a
preempted run, resumed by the same command); Ctrl-C does the same and exits
130; a second Ctrl-C aborts at once.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _cli import parse_flags, run_main  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.train import train, validate_run_config

    validate_run_config(_CONFIG.value)  # the whole config, before any model or data loads
    try:
        result = train(_CONFIG.value, _WORKDIR.value)
    except KeyboardInterrupt:
        print("interrupted: nothing saved for the current step; the same command resumes "
              "from the last checkpoint", file=sys.stderr)  # fmt: skip
        sys.exit(130)
    summary = result.summary
    if summary.get("status") == "completed":
        print(f"done: summary in {os.path.join(_WORKDIR.value, 'summary.json')}")
    else:
        print(f"stopped by {summary['signal']} at step {summary['step']}: checkpoint saved; "
              "the same command resumes the run")  # fmt: skip
        if summary["status"] == "interrupted":
            sys.exit(130)


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
