"""Count trainable and total parameters of PEFT methods on model configs,
without allocating weights (`jax.eval_shape`), as a markdown table.

    python scripts/count_params.py --config=experiments/lora_paper/param_counts.py

The config holds `settings` (name -> {title, model: ModelConfig fields or
hf_config: path to a config.json, method: a PEFT method config, expected,
paper}) and `rows`, the comma-separated names to print. A row whose count
differs from its `expected` is marked and makes the exit status 1.

A training config (`model` + `method`, e.g. experiments/quick/train.py:method=lora)
is counted as one row: its model (random-init fields, or the config.json of a
local `model.checkpoint`) under its method.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _cli import parse_flags, run_main  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Counting config file[:arg].")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "If set, also write the table to WORKDIR/param_counts.md."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from ftjax.rundir import make_dirs, write_text_atomic
    from ftjax.study.param_counts import table

    if _WORKDIR.value:
        make_dirs(_WORKDIR.value, "--workdir")
    text, missed = table(_CONFIG.value)
    print(text)
    if _WORKDIR.value:
        write_text_atomic(os.path.join(_WORKDIR.value, "param_counts.md"), text + "\n")
    if missed:
        print(f"error: counts differ from expected for {', '.join(missed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
