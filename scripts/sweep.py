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
        import contextlib
        import json
        import subprocess

        from ftjax.sweep import RunFailed

        cmd = [sys.executable, os.path.abspath(__file__), f"--config={_CONFIG.value}",
               f"--workdir={_WORKDIR.value}", f"--only={spec.name}", f"--quiet={_QUIET.value}"]  # fmt: skip
        env = {**os.environ, _PARENT_ENV: str(os.getpid())}
        if cores:
            env[_CPUS_ENV] = ",".join(map(str, cores))
        log = None
        if _JOBS.value > 1:  # concurrent runs: their progress bars would interleave
            os.makedirs(run_dir, exist_ok=True)
            log = os.path.join(run_dir, "run.log")
        with open(log, "a") if log else contextlib.nullcontext() as stream:
            child = subprocess.Popen(cmd, stdout=stream, stderr=stream, env=env)
            _CHILDREN.add(child)
            try:
                code = child.wait()
            finally:
                _CHILDREN.discard(child)
        if code:
            if log is None:
                sys.exit(code)  # the run printed its own error line
            raise RunFailed(spec.name, code, log)
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        if summary.get("status") != "completed":
            raise SystemExit(0)  # preempted: its checkpoint is saved; rerun to resume
        if _JOBS.value > 1:
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

    _forward_sigterm()
    try:
        run_sweep(_CONFIG.value, _WORKDIR.value, run_one, only=_ONLY.value, emit=_EMIT.value,
                  jobs=_JOBS.value)  # fmt: skip
    except RunFailed as e:
        last = _last_line(e.log)
        print(f"error: {e}" + (f": {last}" if last else ""), file=sys.stderr)
        sys.exit(e.code)


# A run started by a sweep: the sweep's pid, and the CPUs the run may use.
_PARENT_ENV, _CPUS_ENV = "FTJAX_SWEEP_PARENT", "FTJAX_SWEEP_CPUS"
_CHILDREN: set = set()  # the run processes this sweep is waiting on


def _adopt_sweep_settings() -> None:
    """In a run started by a sweep, before JAX starts (XLA sizes its thread
    pool by the CPUs a process may use): pin to the given CPUs, and ask Linux
    for SIGTERM when the sweep dies, even by SIGKILL. SIGTERM makes the run
    checkpoint and exit, so no orphan keeps writing to a run directory that a
    rerun of the sweep would resume."""
    cpus = os.environ.pop(_CPUS_ENV, "")
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    parent = os.environ.pop(_PARENT_ENV, "")
    if parent and sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if str(os.getppid()) != parent:  # the sweep died before the request took hold
            os.kill(os.getpid(), signal.SIGTERM)


def _forward_sigterm() -> None:
    """A sweep told to stop passes SIGTERM on to its runs (they checkpoint and
    exit) and exits once they have: rerunning the same command resumes them."""
    import signal

    def handler(signum, frame):
        for child in list(_CHILDREN):
            child.send_signal(signal.SIGTERM)
        for child in list(_CHILDREN):
            child.wait()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _last_line(path: str) -> str:
    """The failed run's own error line (the last non-empty line of its log)."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


if __name__ == "__main__":
    _adopt_sweep_settings()
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
