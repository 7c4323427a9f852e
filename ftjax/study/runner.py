"""Run a study's sweep: prerequisites first, then every run not yet finished,
each in its own process (`python -m ftjax.study.runner --only=<run>`), one or
`jobs` at a time; a console line per running run shows its progress.

    main("experiments/forgetting/study.py:quick=1", "runs/q", jobs=2)

Finished runs are skipped and interrupted ones resume from their checkpoints,
so rerunning the same command after a kill finishes only what is missing.
Killing the sweep stops its runs too: each run asks Linux for SIGTERM when
its sweep dies (even by SIGKILL) and checkpoints on it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from ftjax.errors import ConfigError, FtjaxError
from ftjax.rundir import RunDir, make_dirs
from ftjax.study.selection import write_selection
from ftjax.study.sweep import expand, expand_finals, load_study, study_selection

# A run started by a sweep: the sweep's pid, and the CPUs the run may use.
PARENT_ENV, CPUS_ENV = "FTJAX_SWEEP_PARENT", "FTJAX_SWEEP_CPUS"


class RunFailed(FtjaxError):
    """A run's process exited non-zero; `log` is where its output went."""

    def __init__(self, name: str, code: int, log: str = ""):
        self.name, self.code, self.log = name, code, log
        where = f" (log: {log})" if log else ""
        super().__init__(f"run {name} failed with exit code {code}{where}")


class Preempted(FtjaxError):
    """A run stopped on SIGTERM with its checkpoint saved; rerun to resume."""


def usable_cpus() -> list[int] | None:
    """The CPU ids this process may run on, or None where the OS cannot say."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def core_groups(jobs: int) -> list[tuple[int, ...] | None]:
    """This process's CPUs split into `jobs` disjoint groups, one per concurrent
    run: runs pinned to their own cores do not fight over each other's threads
    (XLA sizes its thread pool by the CPUs a process may use). [None] for one job."""
    cpus = usable_cpus()
    if jobs <= 1 or cpus is None or len(cpus) < jobs:
        return [None] * max(jobs, 1)
    return [tuple(cpus[i::jobs]) for i in range(jobs)]


def command_for(config_path: str, sweep_dir: str, name: str) -> str:
    """The shell command that runs one entry on its own (scheduler arrays)."""
    return (
        f"python -m ftjax.study.runner --config={config_path} --workdir={sweep_dir} --only={name}"
    )


# ----------------------------------------------------------------------------- progress


def progress_line(run_dir: str, total_steps: int, started: float, now: float | None = None) -> str:
    """`step 40/100 loss 2.31 · 1m05s elapsed · ETA 1m30s`, from the run's own
    metrics.jsonl (the one file every run writes as it trains)."""
    now = time.time() if now is None else now
    elapsed = now - started
    records = [r for r in RunDir(run_dir).read_metrics() if "loss" in r]
    if not records:
        return f"starting (loading, compiling) · {_duration(elapsed)} elapsed"
    last = records[-1]
    step = int(last["step"])
    if step >= total_steps:
        return f"step {step}/{total_steps} · evaluating · {_duration(elapsed)} elapsed"
    # The rate of this session's steps (a resumed run's earlier steps took no time here).
    first = records[0]["step"] if len(records) == 1 else records[-2]["step"]
    step_time = last.get("step_time") or (elapsed / max(step - first + 1, 1))
    eta = (total_steps - step) * step_time
    return (
        f"step {step}/{total_steps} loss {last['loss']:.3g} · {_duration(elapsed)} elapsed"
        f" · ETA {_duration(eta)}"
    )


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class _Monitor:
    """Prints one progress line per running run every `every` seconds."""

    def __init__(self, out, every: float):
        self.out, self.every = out, every
        self.running: dict[str, tuple[str, str, int, float]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self.every > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()

    def add(self, key: str, head: str, run_dir: str, total_steps: int):
        with self.lock:
            self.running[key] = (head, run_dir, total_steps, time.time())

    def remove(self, key: str):
        with self.lock:
            self.running.pop(key, None)

    def _loop(self):
        while not self.stop.wait(self.every):
            with self.lock:
                running = list(self.running.values())
            for head, run_dir, total, started in running:
                try:
                    line = progress_line(run_dir, total, started)
                except OSError:
                    continue
                print(f"{head}: {line}", file=self.out, flush=True)


# ----------------------------------------------------------------------------- the sweep


def run_sweep(
    config_path: str,
    sweep_dir: str,
    run_one: Callable[..., dict],
    only: str = "",
    emit: str = "",
    out=sys.stdout,
    jobs: int = 1,
    progress_every: float = 0.0,
    slots_for: Callable[[list], list] | None = None,
) -> list[dict]:
    """Runs (or, with emit="commands", prints) every run not yet finished.

    `run_one(spec, run_dir, cores=None)` trains and evaluates one run and
    returns its summary; interrupted runs resume from their checkpoints. With
    `jobs` > 1 the prerequisites run first, one at a time on every core, then
    the sweep's runs `jobs` at a time, each pinned to its share of the cores
    (`run_one` gets the CPU ids); the first failure stops new runs from
    starting and is raised once the running ones end. With `progress_every`
    > 0 each running run's progress is printed that often. `slots_for(specs)`
    (a cluster backend's) replaces `jobs` and the core groups: the slots a
    stage's runs take, one per run at a time, passed to `run_one` as `cores`.

    A study with `get_selection()` runs in two stages (`ftjax.study.selection`):
    its grid, then, once every grid run has finished, the choice (written to
    selection.json) and the final seeds at the chosen points. The choice is
    recomputed from the grid runs' summaries on every call, so a sweep stopped
    between the stages resumes to the same one. With `emit="commands"` the
    final seeds are printed once the grid has finished (before, a comment
    says to emit again)."""
    study = load_study(config_path)
    study_arg = config_path.split(":", 1)[1] if ":" in config_path else ""
    prereqs, runs = expand(study, sweep_dir, study_arg)
    selection = study_selection(study, study_arg)
    if emit == "commands":
        # Prerequisites first: a scheduler runs the first line, then the array.
        for spec in prereqs + runs:
            print(command_for(config_path, sweep_dir, spec.name), file=out)
        if selection is not None:
            finals = _finals_if_chosen(study, sweep_dir, study_arg)
            if finals is None:
                print("# then, once these have finished, emit again for the final seeds at the "
                      "selected values", file=out)  # fmt: skip
            for spec in finals or []:
                print(command_for(config_path, sweep_dir, spec.name), file=out)
        return []
    if emit:
        raise ConfigError(f"--emit={emit!r}; expected 'commands' or nothing")
    if jobs < 1:
        raise ConfigError(f"--jobs={jobs}; expected an int >= 1")
    if only:
        specs = prereqs + runs
        if selection is not None and only not in {s.name for s in specs}:
            specs += _finals_if_chosen(study, sweep_dir, study_arg) or []
        selected = [s for s in specs if s.name == only]
        if not selected:
            names = ", ".join(s.name for s in specs)
            raise ConfigError(f"--only={only!r} names no run; runs: {names}")
        prereqs = [s for s in prereqs if s.name == only]
        runs = [s for s in selected if s not in prereqs]
    make_dirs(sweep_dir, "--workdir")
    t0 = time.time()
    stage = _Stage(sweep_dir, run_one, out, jobs, t0, progress_every, slots_for)
    summaries = stage.run(prereqs, runs, "grid" if selection is not None and not only else "")
    if selection is not None and not only:
        chosen, finals = expand_finals(study, sweep_dir, study_arg)
        path = write_selection(sweep_dir, chosen)
        print(f"selection: each row's choice on the validation split in {path}", file=out,
              flush=True)  # fmt: skip
        summaries += stage.run([], finals, "final")
    print(f"sweep done: {stage.count} runs in {time.time() - t0:.0f}s", file=out, flush=True)
    return summaries


def _finals_if_chosen(study, sweep_dir, study_arg):
    """The final-stage runs once the grid has finished, else None."""
    try:
        return expand_finals(study, sweep_dir, study_arg)[1]
    except ConfigError as e:
        if str(e).startswith("selection:"):
            return None
        raise


class _Stage:
    """Runs one stage's runs (prerequisites alone and first, then the rest
    `jobs` at a time), skipping finished ones."""

    def __init__(self, sweep_dir, run_one, out, jobs, t0, progress_every, slots_for=None):
        self.sweep_dir, self.run_one, self.out, self.jobs = sweep_dir, run_one, out, jobs
        self.t0, self.progress_every, self.count = t0, progress_every, 0
        self.slots_for = slots_for

    def run(self, prereqs, runs, name: str = "") -> list[dict]:
        out, jobs, t0 = self.out, self.jobs, self.t0
        selected = prereqs + runs
        total = len(selected)
        self.count += total
        if name:
            print(f"stage {name}: {total} run(s)", file=out, flush=True)
        summaries: dict[int, dict] = {}
        pending = []
        prereq_names = {s.name for s in prereqs}
        for i, spec in enumerate(selected, 1):
            run = RunDir(os.path.join(self.sweep_dir, spec.name))
            # A sweep run counts as done once its evaluation is merged, not when training ends.
            if run.is_finished(evaluated=spec.name not in prereq_names):
                print(f"[run {i}/{total}] {spec.name}: finished, skipped", file=out, flush=True)
                summaries[i] = run.read_summary()
            else:
                pending.append((i, spec, run.path))
        groups = None
        if self.slots_for is not None:
            groups = self.slots_for([p[1] for p in pending if p[1].name not in prereq_names])
            jobs = len(groups)
        # Prerequisites always run alone: the sweep's runs read what they write.
        serial = [p for p in pending if jobs == 1 or p[1].name in prereq_names]
        parallel = [p for p in pending if p not in serial]
        with _Monitor(out, self.progress_every) as monitor:
            for i, spec, run_dir in serial:
                head = f"[run {i}/{total}] {spec.name}"
                print(f"{head}: running in {run_dir} (sweep {time.time() - t0:.0f}s)", file=out,
                      flush=True)  # fmt: skip
                monitor.add(spec.name, head, run_dir, int(spec.config.train.steps))
                slot = {} if spec.name in prereq_names or not groups else {"cores": groups[0]}
                try:
                    summaries[i] = self.run_one(spec, run_dir, **slot)
                finally:
                    monitor.remove(spec.name)
            if parallel:
                summaries.update(
                    _run_parallel(parallel, self.run_one, jobs, total, t0, out, monitor, groups)
                )
        return [summaries[i] for i in sorted(summaries)]


def _run_parallel(pending, run_one, jobs, total, t0, out, monitor, groups=None) -> dict[int, dict]:
    """`jobs` runs at a time, each on its own group of cores, or slot of
    `groups` (see run_sweep)."""
    free = list(groups) if groups is not None else core_groups(jobs)
    summaries, failure = {}, None
    queue = list(pending)
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        running = {}
        while queue or running:
            while queue and free and failure is None:
                i, spec, run_dir = queue.pop(0)
                cores = free.pop(0)
                on = f" on cores {','.join(map(str, cores))}" if isinstance(cores, tuple) else ""
                head = f"[run {i}/{total}] {spec.name}"
                print(f"{head}: started{on} (sweep {time.time() - t0:.0f}s)", file=out, flush=True)
                monitor.add(spec.name, head, run_dir, int(spec.config.train.steps))
                future = pool.submit(run_one, spec, run_dir, cores=cores)
                running[future] = (i, spec, cores, time.time())
            if not running:
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                i, spec, cores, started = running.pop(future)
                monitor.remove(spec.name)
                free.append(cores)
                try:
                    summaries[i] = future.result()
                except (RunFailed, Preempted) as e:
                    failure = failure or e
                    print(f"[run {i}/{total}] {spec.name}: FAILED ({e})", file=out, flush=True)
                    continue
                took = time.time() - started
                print(f"[run {i}/{total}] {spec.name}: done in {took:.0f}s", file=out, flush=True)
    if failure is not None:
        raise failure
    return summaries


# ----------------------------------------------------------------------------- one run


def run_in_process(spec, run_dir: str, quiet: bool = False) -> dict:
    """Trains (or resumes) one run, then evaluates it; returns its summary.
    A run stopped by SIGTERM raises `Preempted` (its checkpoint is saved)."""
    from ftjax.study.evaluate import curve_evaluator, evaluate_run, training_eval_sets
    from ftjax.train import train

    prerequisite = spec.config.get("study", {}).get("stage") == "pretrain"
    if prerequisite:
        # The base model: the report leaves it out. Marked before training (the
        # loop merges its summary into this), so no crash leaves it unmarked.
        RunDir(run_dir).update_summary(role="prerequisite")
    result = train(spec.config, run_dir, quiet=quiet, curve=curve_evaluator(spec.config))
    if result.summary.get("status") != "completed":
        raise Preempted(f"run {spec.name}: stopped at a checkpoint; rerun the sweep to resume")
    if not prerequisite:
        # The final losses are the loop's last evaluation: not computed twice.
        final_sets = training_eval_sets(result.summary, spec.config)
        evaluate_run(result, spec.config, run_dir, final_sets=final_sets)
    return RunDir(run_dir).read_summary()


_CHILDREN: set = set()  # the run processes this sweep is waiting on


def spawn_run(config_path, sweep_dir, spec, run_dir, cores=None, quiet=False, concurrent=1):
    """Runs one run in its own process (per-run peak memory, nothing carried
    over), pinned to `cores`. With `concurrent` > 1 runs at a time its output
    goes to `<run>/run.log` (concurrent runs' output would interleave)."""
    cmd = [sys.executable, "-m", "ftjax.study.runner", f"--config={config_path}",
           f"--workdir={sweep_dir}", f"--only={spec.name}"] + (["--quiet"] if quiet else [])  # fmt: skip
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
    if cores:
        env[CPUS_ENV] = ",".join(map(str, cores))
    log = None
    if concurrent > 1:
        os.makedirs(run_dir, exist_ok=True)
        log = os.path.join(run_dir, "run.log")
    with open(log, "a") if log else contextlib.nullcontext() as stream:
        child = subprocess.Popen(cmd, stdout=stream, stderr=stream, env=env)
        _CHILDREN.add(child)
        try:
            code = child.wait()
        finally:
            _CHILDREN.discard(child)
    if code == PREEMPTED_EXIT:
        raise Preempted(f"run {spec.name}: stopped at a checkpoint; rerun the sweep to resume")
    if code:
        raise RunFailed(spec.name, code, log or "")
    run = RunDir(run_dir)
    if concurrent > 1:
        # Its speed was measured sharing the machine: say so beside the figures.
        return run.update_summary(
            concurrent_runs=concurrent, cpu_cores=len(cores) if cores else os.cpu_count()
        )
    return run.read_summary()


# A run that stopped on SIGTERM exits with this code (EX_TEMPFAIL: try again).
PREEMPTED_EXIT = 75


def forward_sigterm() -> None:
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


def forward_stop(stop: Callable[[], None]) -> None:
    """SIGTERM or Ctrl-C to a cluster sweep's driver: `stop()` cancels its
    runs, which checkpoint; the waits on them then end the sweep as
    preempted (a second Ctrl-C aborts at once)."""
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"{signal.Signals(signum).name}: stopping the runs at a checkpoint; rerun the "
              "same command to resume them", file=sys.stderr, flush=True)  # fmt: skip
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def adopt_sweep_settings() -> None:
    """In a run started by a sweep, before JAX starts (XLA sizes its thread
    pool by the CPUs a process may use): pin to the given CPUs, and ask Linux
    for SIGTERM when the sweep dies, even by SIGKILL. SIGTERM makes the run
    checkpoint and exit, so no orphan keeps writing to a run directory that a
    rerun of the sweep would resume."""
    cpus = os.environ.pop(CPUS_ENV, "")
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    parent = os.environ.pop(PARENT_ENV, "")
    if parent and sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if str(os.getppid()) != parent:  # the sweep died before the request took hold
            os.kill(os.getpid(), signal.SIGTERM)


def main(
    config_path: str,
    sweep_dir: str,
    *,
    only: str = "",
    emit: str = "",
    quiet: bool = False,
    isolate: bool = True,
    jobs: int = 1,
    progress_every: float = 15.0,
    out=sys.stdout,
    backend: str = "local",
    ray_address: str = "",
    max_retries: int = 3,
) -> list[dict]:
    """The sweep command (`scripts/sweep.py`, `python -m ftjax`): each run in
    its own process unless `isolate=False`; progress lines every
    `progress_every` seconds for runs whose own output is not on the console.
    `backend="ray"` runs them as tasks of a Ray cluster (`ray_address`, else
    `RAY_ADDRESS`, else a local one; `ftjax.study.ray_backend`)."""
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend={backend!r}; expected local or ray")
    if backend == "ray" and not emit:
        from ftjax.study import ray_backend

        cluster = ray_backend.RayBackend(config_path, sweep_dir, address=ray_address,
                                         max_retries=max_retries, quiet=quiet)  # fmt: skip
        forward_stop(cluster.stop)
        try:
            return run_sweep(config_path, sweep_dir, cluster.run_one, only=only, out=out,
                             progress_every=progress_every,
                             slots_for=lambda specs: ray_backend.slots(cluster, specs))  # fmt: skip
        finally:
            cluster.close()

    def run_one(spec, run_dir, cores=None):
        if isolate or jobs > 1:
            return spawn_run(config_path, sweep_dir, spec, run_dir, cores, quiet, jobs)
        return run_in_process(spec, run_dir, quiet)

    forward_sigterm()
    watch = progress_every if (quiet or jobs > 1) else 0.0
    return run_sweep(config_path, sweep_dir, run_one, only=only, emit=emit, out=out, jobs=jobs,
                     progress_every=watch)  # fmt: skip


def _run_entry(argv: list[str]) -> None:
    """`python -m ftjax.study.runner --config=STUDY[:arg] --workdir=SWEEP
    --only=RUN [--quiet]`: one run of a sweep, in this process."""
    parser = argparse.ArgumentParser(prog="python -m ftjax.study.runner")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--only", required=True)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    adopt_sweep_settings()
    from ftjax import cli

    def one(_):
        study = load_study(args.config)
        study_arg = args.config.split(":", 1)[1] if ":" in args.config else ""
        prereqs, runs = expand(study, args.workdir, study_arg)
        specs = {s.name: s for s in prereqs + runs}
        if args.only not in specs and study_selection(study, study_arg) is not None:
            finals = _finals_if_chosen(study, args.workdir, study_arg) or []
            specs.update({s.name: s for s in finals})
        if args.only not in specs:
            raise ConfigError(f"--only={args.only!r} names no run; runs: {', '.join(specs)}")
        try:
            run_in_process(specs[args.only], os.path.join(args.workdir, args.only), args.quiet)
        except Preempted as e:
            print(e, file=sys.stderr)
            sys.exit(PREEMPTED_EXIT)

    cli.run_main(one, argv)


if __name__ == "__main__":
    _run_entry(sys.argv[1:])
