"""Run a study's sweep: prerequisites, then each run in its own directory.

    python scripts/sweep.py --config=experiments/forgetting/study.py --workdir=runs/forgetting
    python scripts/sweep.py ... --emit=commands     # one command per run, for a scheduler
    python scripts/sweep.py ... --only=<run name>   # one run (what --emit prints)
    python scripts/sweep.py ... --jobs=2            # two runs at a time, each on half the cores
    python scripts/sweep.py ... --backend=ray       # runs as Ray tasks (RAY_ADDRESS or a local cluster)

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
_QUIET = flags.DEFINE_bool("quiet", False, "Less output per step; progress lines instead.")
_ISOLATE = flags.DEFINE_bool(
    "isolate", True, "Run each run in its own process (per-run peak memory, no state carried over)."
)
_JOBS = flags.DEFINE_integer(
    "jobs",
    1,
    "Runs at a time (each in its own process, pinned to its share of the CPU cores; "
    "its output goes to <run>/run.log). Small models gain: one run cannot keep every core busy.",
)
_PROGRESS = flags.DEFINE_float(
    "progress_every", 15.0, "Seconds between progress lines of the running runs (0: none)."
)
_BACKEND = flags.DEFINE_enum(
    "backend", "local", ["local", "ray"],
    "local: this machine's processes (--jobs); ray: tasks of a Ray cluster, each with the "
    "resources of its config's `resources` section (README, 'Sweeps on a cluster').",
)  # fmt: skip
_RAY_ADDRESS = flags.DEFINE_string(
    "ray_address", "", "Ray cluster to join (e.g. auto, ray://head:10001); default RAY_ADDRESS, "
    "else a local cluster on this machine.",
)  # fmt: skip
_MAX_RETRIES = flags.DEFINE_integer(
    "max_retries", 3, "Ray: times a run whose node or worker died (or was preempted) is retried; "
    "each retry resumes from the run's last checkpoint.",
)  # fmt: skip
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from ftjax.study.runner import PREEMPTED_EXIT, Preempted, RunFailed
    from ftjax.study.runner import main as sweep

    try:
        sweep(_CONFIG.value, _WORKDIR.value, only=_ONLY.value, emit=_EMIT.value,
              quiet=_QUIET.value, isolate=_ISOLATE.value, jobs=_JOBS.value,
              progress_every=_PROGRESS.value, backend=_BACKEND.value,
              ray_address=_RAY_ADDRESS.value, max_retries=_MAX_RETRIES.value)  # fmt: skip
    except RunFailed as e:
        if not e.log:  # the run's output was on the console, its error line included
            sys.exit(e.code)
        last = _last_line(e.log)
        print(f"error: {e}" + (f": {last}" if last else ""), file=sys.stderr)
        sys.exit(e.code)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)


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
