"""Train (or resume) one run.

    python scripts/train.py --config=experiments/forgetting/finetune.py:method=lora \
        --workdir=runs/lora --config.optim.lr=3e-4

A --workdir that already holds a checkpoint resumes from it. Exits non-zero
with one line on bad input.
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
    from ftjax.train import train

    result = train(_CONFIG.value, _WORKDIR.value)
    if result.summary.get("status") == "completed":
        print(f"done: summary in {os.path.join(_WORKDIR.value, 'summary.json')}")


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
