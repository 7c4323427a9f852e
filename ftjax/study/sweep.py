"""Expand a study's sweep and run it: one run directory per override dict.

A study is a Python file with `get_config(arg=None)`, `get_sweep()` (a list of
override dicts) and optionally `get_prerequisites()` (runs that must finish
first, e.g. pre-training the base model the sweep fine-tunes). An override dict
holds `arg` (passed to `get_config`, the switch that rewrites several fields,
e.g. "method=lora,rank=16") and dotted config paths (`"train.seed": 1`):

>>> get_sweep = lambda: product(arg=["method=full", "method=lora"], **{"train.seed": [0, 1]})

Config strings may contain `{sweep_dir}`, replaced by the sweep's workdir, so a
fine-tuning run can point at its prerequisite's exported weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable

import ml_collections

from ftjax.errors import ConfigError, FtjaxError


@dataclasses.dataclass
class RunSpec:
    name: str
    config: ml_collections.ConfigDict
    overrides: dict


def product(**axes) -> list[dict]:
    """Every combination of the given values: product(a=[1, 2], b=[3]) ->
    [{a: 1, b: 3}, {a: 2, b: 3}]. Dotted keys via **{"train.seed": [...]}."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def zip_(**axes) -> list[dict]:
    """Values taken together: zip_(a=[1, 2], b=[3, 4]) -> [{a: 1, b: 3}, {a: 2, b: 4}]."""
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"zip_: axes have different lengths {lengths}; expected equal lengths")
    keys = list(axes)
    return [dict(zip(keys, values)) for values in zip(*axes.values())]


def cross(a: list[dict], b: list[dict]) -> list[dict]:
    """Each dict of `a` merged with each of `b`."""
    return [{**x, **y} for x in a for y in b]


def load_study(path: str):
    """Imports an experiment file (``path`` may carry ``:arg``, ignored here)."""
    path = path.split(":", 1)[0]
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such experiment file {path}")
    name = "ftjax_study_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: an experiment file must define get_config(arg=None)")
    return module


def set_path(cfg: ml_collections.ConfigDict, dotted: str, value, origin: str = "override"):
    """cfg.a.b = value, failing with one line on a key the config does not have."""
    node = cfg
    parts = str(dotted).split(".")
    for i, p in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            section = ".".join(parts[:i])
            raise ConfigError(
                f"{origin}: unknown config key {dotted!r} ({section} is a "
                f"{type(node).__name__}, not a section)"
            )
        if p not in node:
            where = f" (no {p!r})" if i < len(parts) - 1 else ""
            raise ConfigError(f"{origin}: unknown config key {dotted!r}{where}")
        if i < len(parts) - 1:
            node = node[p]
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:  # ConfigDict's type check on the field
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{origin}: {dotted}={value!r}: {first}") from None


def run_name(overrides: dict) -> str:
    parts = []
    for k, v in overrides.items():
        if k == "arg":
            parts.extend(str(v).split(",") if v else [])
        else:
            parts.append(f"{k.split('.')[-1]}={v}")
    name = ",".join(parts) or "default"
    return re.sub(r"[^\w.,=+-]", "_", name)


def check_run_name(name, origin: str) -> str:
    """`name` if it is one safe path component (the run's directory under the
    sweep directory), else a ConfigError naming the entry."""
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or name != name.strip()
    ):
        raise ConfigError(
            f"{origin}: run name {name!r} is not a safe directory name; expected a non-empty "
            "name without '/', '\\', surrounding spaces or a leading '.'"
        )
    return name


def substitute(cfg: ml_collections.ConfigDict, sweep_dir: str) -> None:
    """Replaces `{sweep_dir}` in every string field, in place."""
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            substitute(value, sweep_dir)
        elif isinstance(value, str) and "{sweep_dir}" in value:
            cfg[key] = value.replace("{sweep_dir}", sweep_dir)


def _call_with_arg(fn, study_arg: str):
    """get_sweep()/get_prerequisites() may take the study-level arg (e.g. quick=1)."""
    import inspect

    return fn(study_arg) if inspect.signature(fn).parameters else fn()


def _join_args(*args) -> str:
    return ",".join(a for a in args if a)


def expand(study, sweep_dir: str, study_arg: str = "") -> tuple[list[RunSpec], list[RunSpec]]:
    """(prerequisite runs, sweep runs), each with its config built and checked.

    `study_arg` (from --config=study.py:ARG) is prepended to every run's arg."""

    def build(overrides: dict, origin: str) -> ml_collections.ConfigDict:
        cfg = study.get_config(_join_args(study_arg, overrides.get("arg")) or None)
        for k, v in overrides.items():
            if k not in ("arg", "name"):
                set_path(cfg, k, v, origin)
        substitute(cfg, os.path.abspath(sweep_dir))
        return cfg

    prereqs = []
    for name, arg in _call_with_arg(getattr(study, "get_prerequisites", lambda: []), study_arg):
        origin = f"prerequisite {name!r}"
        check_run_name(name, origin)
        prereqs.append(RunSpec(name, build({"arg": arg}, origin), {"arg": arg}))
    sweep = _call_with_arg(getattr(study, "get_sweep", lambda: [{}]), study_arg)
    runs = []
    for i, overrides in enumerate(sweep):
        origin = f"sweep entry {i}"
        if not isinstance(overrides, dict):
            raise ConfigError(f"{origin}: got {overrides!r}; expected a dict of overrides")
        name = overrides["name"] if "name" in overrides else run_name(overrides)
        check_run_name(name, origin + (" (its 'name')" if "name" in overrides else ""))
        runs.append(RunSpec(name, build(overrides, origin), overrides))
    names = [r.name for r in prereqs + runs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"sweep: duplicate run names {sorted(dup)}; give entries a 'name'")
    return prereqs, runs


def is_finished(run_dir: str) -> bool:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("status") == "completed"


def command_for(config_path: str, sweep_dir: str, name: str) -> str:
    """The shell command that runs one entry on its own (scheduler arrays)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "sweep.py")
    return (
        f"python {os.path.normpath(script)} --config={config_path} --workdir={sweep_dir} "
        f"--only={name}"
    )


class RunFailed(FtjaxError):
    """A run's process exited non-zero; `log` is where its output went."""

    def __init__(self, name: str, code: int, log: str = ""):
        self.name, self.code, self.log = name, code, log
        where = f" (log: {log})" if log else ""
        super().__init__(f"run {name} failed with exit code {code}{where}")


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


def run_sweep(
    config_path: str,
    sweep_dir: str,
    run_one: Callable[..., dict],
    only: str = "",
    emit: str = "",
    out=sys.stdout,
    jobs: int = 1,
) -> list[dict]:
    """Runs (or, with emit="commands", prints) every run not yet finished.

    `run_one(spec, run_dir, cores=None)` trains and evaluates one run and
    returns its summary; interrupted runs resume from their checkpoints. With
    `jobs` > 1 the prerequisites run first, one at a time on every core, then
    the sweep's runs `jobs` at a time, each pinned to its share of the cores
    (`run_one` gets the CPU ids); the first failure stops new runs from
    starting and is raised once the running ones end."""
    study = load_study(config_path)
    study_arg = config_path.split(":", 1)[1] if ":" in config_path else ""
    prereqs, runs = expand(study, sweep_dir, study_arg)
    if emit == "commands":
        # Prerequisites first: a scheduler runs the first line, then the array.
        for spec in prereqs + runs:
            print(command_for(config_path, sweep_dir, spec.name), file=out)
        return []
    if emit:
        raise ConfigError(f"--emit={emit!r}; expected 'commands' or nothing")
    if jobs < 1:
        raise ConfigError(f"--jobs={jobs}; expected an int >= 1")
    selected = prereqs + runs
    if only:
        selected = [s for s in selected if s.name == only]
        if not selected:
            names = ", ".join(s.name for s in prereqs + runs)
            raise ConfigError(f"--only={only!r} names no run; runs: {names}")
    os.makedirs(sweep_dir, exist_ok=True)
    t0 = time.time()
    total = len(selected)
    summaries: dict[int, dict] = {}
    pending = []
    for i, spec in enumerate(selected, 1):
        run_dir = os.path.join(sweep_dir, spec.name)
        if is_finished(run_dir):
            print(f"[run {i}/{total}] {spec.name}: finished, skipped", file=out, flush=True)
            with open(os.path.join(run_dir, "summary.json")) as f:
                summaries[i] = json.load(f)
        else:
            pending.append((i, spec, run_dir))
    prereq_names = {s.name for s in prereqs}
    # Prerequisites always run alone: the sweep's runs read what they write.
    serial = [p for p in pending if jobs == 1 or p[1].name in prereq_names]
    parallel = [p for p in pending if p not in serial]
    for i, spec, run_dir in serial:
        head = f"[run {i}/{total}] {spec.name}"
        print(f"{head}: running in {run_dir} (sweep {time.time() - t0:.0f}s)", file=out, flush=True)
        summaries[i] = run_one(spec, run_dir)
    if parallel:
        summaries.update(_run_parallel(parallel, run_one, jobs, total, t0, out))
    print(f"sweep done: {total} runs in {time.time() - t0:.0f}s", file=out, flush=True)
    return [summaries[i] for i in sorted(summaries)]


def _run_parallel(pending, run_one, jobs, total, t0, out) -> dict[int, dict]:
    """`jobs` runs at a time, each on its own group of cores (see run_sweep)."""
    import concurrent.futures as cf

    free = core_groups(jobs)
    summaries, failure = {}, None
    queue = list(pending)
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        running = {}
        while queue or running:
            while queue and free and failure is None:
                i, spec, run_dir = queue.pop(0)
                cores = free.pop(0)
                on = f" on cores {','.join(map(str, cores))}" if cores else ""
                print(f"[run {i}/{total}] {spec.name}: started{on} (sweep {time.time() - t0:.0f}s)",
                      file=out, flush=True)  # fmt: skip
                future = pool.submit(run_one, spec, run_dir, cores=cores)
                running[future] = (i, spec, cores, time.time())
            if not running:
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                i, spec, cores, started = running.pop(future)
                free.append(cores)
                try:
                    summaries[i] = future.result()
                except RunFailed as e:
                    failure = failure or e
                    print(f"[run {i}/{total}] {spec.name}: FAILED ({e})", file=out, flush=True)
                    continue
                took = time.time() - started
                print(f"[run {i}/{total}] {spec.name}: done in {took:.0f}s", file=out, flush=True)
    if failure is not None:
        raise failure
    return summaries
