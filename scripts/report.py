"""Aggregate a sweep's run directories into report.md and PNG plots.

python scripts/report.py --workdir=runs/forgetting
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _cli import parse_flags, run_main  # noqa: E402
from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory holding run directories.")
_TARGET = flags.DEFINE_string("target", "target", "Eval set that measures learning.")
_GENERAL = flags.DEFINE_string("general", "general", "Eval set that measures forgetting.")
_METRIC = flags.DEFINE_string("metric", "exact_match", "Metric of the table and plots.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from ftjax.study.report import write_report

    path = write_report(_WORKDIR.value, _TARGET.value, _GENERAL.value, _METRIC.value)
    print(f"report: {path}")


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
