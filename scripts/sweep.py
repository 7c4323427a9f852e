"""Run a study's sweep: prerequisites, then each run in its own directory.

    python scripts/sweep.py --config=experiments/forgetting/study.py --workdir=runs/forgetting
    python scripts/sweep.py ... --emit=commands     # one command per run, for a scheduler
    python scripts/sweep.py ... --only=<run name>   # one run (what --emit prints)

Finished runs are skipped; interrupted ones resume from their checkpoints.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _cli import parse_flags, run_main  # noqa: E402
from absl import app, flags  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "Experiment (study) file with get_config/get_sweep.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory; one sub-directory per run.")
_ONLY = flags.DEFINE_string("only", "", "Run only the run of this name.")
_EMIT = flags.DEFINE_string("emit", "", "'commands': print one command line per run instead.")
_QUIET = flags.DEFINE_bool("quiet", False, "Less output per step.")
_ISOLATE = flags.DEFINE_bool(
    "isolate", True, "Run each run in its own process (per-run peak memory, no state carried over)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.experiment import evaluate_run
    from ftjax.sweep import run_sweep
    from ftjax.train import train
    from ftjax.train.loop import write_summary

    def run_in_subprocess(spec, run_dir):
        import json
        import subprocess

        cmd = [sys.executable, os.path.abspath(__file__), f"--config={_CONFIG.value}",
               f"--workdir={_WORKDIR.value}", f"--only={spec.name}", f"--quiet={_QUIET.value}"]  # fmt: skip
        code = subprocess.call(cmd)
        if code:
            sys.exit(code)  # the run printed its own error line
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)

    def run_one(spec, run_dir):
        if _ISOLATE.value and not _ONLY.value:
            return run_in_subprocess(spec, run_dir)
        result = train(spec.config, run_dir, quiet=_QUIET.value)
        if result.summary.get("status") != "completed":
            sys.exit(0)  # preempted: the checkpoint is saved; rerun to resume
        if spec.config.study.stage == "pretrain":
            result.summary["role"] = "prerequisite"  # the report leaves it out
            write_summary(run_dir, result.summary)
            return result.summary
        evaluate_run(result, spec.config, run_dir)
        return result.summary

    run_sweep(_CONFIG.value, _WORKDIR.value, run_one, only=_ONLY.value, emit=_EMIT.value)


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
