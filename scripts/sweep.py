"""Run a study's sweep: prerequisites, then each run in its own directory.

    python scripts/sweep.py --config=experiments/forgetting/study.py --workdir=runs/forgetting
    python scripts/sweep.py ... --emit=commands     # one command per run, for a scheduler
    python scripts/sweep.py ... --only=<run name>   # one run (what --emit prints)
    python scripts/sweep.py ... --jobs=2            # two runs at a time, each on half the cores

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
_JOBS = flags.DEFINE_integer(
    "jobs",
    1,
    "Runs at a time (each in its own process, pinned to its share of the CPU cores; "
    "its output goes to <run>/run.log). Small models gain: one run cannot keep every core busy.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.experiment import evaluate_run
    from ftjax.sweep import run_sweep
    from ftjax.train import train
    from ftjax.train.loop import write_summary

    def run_in_subprocess(spec, run_dir, cores=None):
        import json
        import subprocess

        from ftjax.sweep import RunFailed

        cmd = [sys.executable, os.path.abspath(__file__), f"--config={_CONFIG.value}",
               f"--workdir={_WORKDIR.value}", f"--only={spec.name}", f"--quiet={_QUIET.value}"]  # fmt: skip
        log = None
        if _JOBS.value > 1:  # concurrent runs: their progress bars would interleave
            os.makedirs(run_dir, exist_ok=True)
            log = os.path.join(run_dir, "run.log")
        pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        with open(log, "a") if log else open(os.devnull) as sink:
            stream = sink if log else None
            code = subprocess.call(cmd, stdout=stream, stderr=stream, preexec_fn=pin)
        if code:
            if log is None:
                sys.exit(code)  # the run printed its own error line
            raise RunFailed(spec.name, code, log)
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        if _JOBS.value > 1 and summary.get("status") == "completed":
            # Its speed was measured sharing the machine: say so beside the figures.
            summary["concurrent_runs"] = _JOBS.value
            summary["cpu_cores"] = len(cores) if cores else os.cpu_count()
            write_summary(run_dir, summary)
        return summary

    def run_one(spec, run_dir, cores=None):
        if (_ISOLATE.value or _JOBS.value > 1) and not _ONLY.value:
            return run_in_subprocess(spec, run_dir, cores)
        result = train(spec.config, run_dir, quiet=_QUIET.value)
        if result.summary.get("status") != "completed":
            sys.exit(0)  # preempted: the checkpoint is saved; rerun to resume
        if spec.config.study.stage == "pretrain":
            result.summary["role"] = "prerequisite"  # the report leaves it out
            write_summary(run_dir, result.summary)
            return result.summary
        evaluate_run(result, spec.config, run_dir)
        return result.summary

    from ftjax.sweep import RunFailed

    try:
        run_sweep(_CONFIG.value, _WORKDIR.value, run_one, only=_ONLY.value, emit=_EMIT.value,
                  jobs=_JOBS.value)  # fmt: skip
    except RunFailed as e:
        last = _last_line(e.log)
        print(f"error: {e}" + (f": {last}" if last else ""), file=sys.stderr)
        sys.exit(e.code)


def _last_line(path: str) -> str:
    """The failed run's own error line (the last non-empty line of its log)."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
