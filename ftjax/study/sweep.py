"""Expand a study's sweep into runs: one run directory per override dict
(`ftjax.study.runner` runs them).

A study is a Python file with `get_config(arg=None)`, `get_sweep()` (a list of
override dicts) and optionally `get_prerequisites()` (runs that must finish
first, e.g. pre-training the base model the sweep fine-tunes). An override dict
holds `arg` (passed to `get_config`, the switch that rewrites several fields,
e.g. "method=lora,rank=16") and dotted config paths (`"train.seed": 1`):

    def get_sweep():
        return product(arg=["method=full", "method=lora"], **{"train.seed": [0, 1]})

Config strings may contain `{sweep_dir}`, replaced by the sweep's workdir, so a
fine-tuning run can point at its prerequisite's exported weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re

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
    if spec is None:
        raise ConfigError(f"--config: {path} is not a Python file; expected an experiment file")
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


def validate_study_config(cfg, origin: str = "") -> None:
    """A study run's config: the run config (`ftjax.train.validate_run_config`)
    and the eval section; the error is prefixed by `origin` (the sweep entry)."""
    from ftjax.study.evaluate import validate_eval_config
    from ftjax.train import validate_run_config

    try:
        validate_run_config(cfg)
        if "eval" in cfg:
            validate_eval_config(cfg.eval)
        if "mean" in cfg.data.sources:  # the forgetting averages' key
            raise ConfigError('data.sources.mean: a source may not be named "mean"')
    except FtjaxError as e:
        if not origin:
            raise
        raise type(e)(f"{origin}: {e}") from None


def _call_with_arg(fn, study_arg: str):
    """get_sweep()/get_prerequisites() may take the study-level arg (e.g. quick=1)."""
    import inspect

    return fn(study_arg) if inspect.signature(fn).parameters else fn()


def _join_args(*args) -> str:
    return ",".join(a for a in args if a)


def expand(study, sweep_dir: str, study_arg: str = "") -> tuple[list[RunSpec], list[RunSpec]]:
    """(prerequisite runs, sweep runs), each with its config built and checked.

    `study_arg` (from --config=study.py:ARG) is prepended to every run's arg.
    Every run's whole config is validated here (`validate_run_config`, and the
    study's eval section), so that a bad one stops the sweep before its first
    run starts; the error names the entry."""

    def build(overrides: dict, origin: str) -> ml_collections.ConfigDict:
        return _build_config(study, study_arg, sweep_dir, overrides, origin)

    prereqs = []
    for name, arg in _call_with_arg(getattr(study, "get_prerequisites", lambda: []), study_arg):
        origin = f"prerequisite {name!r}"
        check_run_name(name, origin)
        prereqs.append(RunSpec(name, build({"arg": arg}, origin), {"arg": arg}))
    selection = study_selection(study, study_arg)
    if selection is not None:
        # The grid stage; the final seeds follow once it is chosen (`expand_finals`).
        from ftjax.study.selection import grid_entries

        sweep = (
            list(_call_with_arg(study.get_sweep, study_arg)) if hasattr(study, "get_sweep") else []
        )
        sweep += grid_entries(selection)
    else:
        sweep = _call_with_arg(getattr(study, "get_sweep", lambda: [{}]), study_arg)
    runs = _build_entries(sweep, build)
    names = [r.name for r in prereqs + runs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"sweep: duplicate run names {sorted(dup)}; give entries a 'name'")
    return prereqs, runs


def study_selection(study, study_arg: str = "") -> dict | None:
    """The study's checked `get_selection()` declaration, or None."""
    if not hasattr(study, "get_selection"):
        return None
    from ftjax.study.selection import check_selection

    return check_selection(_call_with_arg(study.get_selection, study_arg))


def expand_finals(study, sweep_dir: str, study_arg: str = "") -> tuple[dict, list[RunSpec]]:
    """(the selection, the final-stage runs) of a study with `get_selection`,
    chosen from its finished grid runs (ConfigError while one is unfinished)."""
    from ftjax.study.selection import final_entries, select

    selection = study_selection(study, study_arg)
    chosen = select(selection, sweep_dir)

    def build(overrides: dict, origin: str) -> ml_collections.ConfigDict:
        return _build_config(study, study_arg, sweep_dir, overrides, origin)

    return chosen, _build_entries(final_entries(selection, chosen), build, "final entry")


def _build_config(study, study_arg, sweep_dir, overrides: dict, origin: str):
    cfg = study.get_config(_join_args(study_arg, overrides.get("arg")) or None)
    for k, v in overrides.items():
        if k not in ("arg", "name"):
            set_path(cfg, k, v, origin)
    substitute(cfg, os.path.abspath(sweep_dir))
    validate_study_config(cfg, origin)
    return cfg


def _build_entries(sweep, build, what: str = "sweep entry") -> list[RunSpec]:
    runs = []
    for i, overrides in enumerate(sweep):
        origin = f"{what} {i}"
        if not isinstance(overrides, dict):
            raise ConfigError(f"{origin}: got {overrides!r}; expected a dict of overrides")
        name = overrides["name"] if "name" in overrides else run_name(overrides)
        check_run_name(name, origin + (" (its 'name')" if "name" in overrides else ""))
        runs.append(RunSpec(name, build(overrides, origin), overrides))
    return runs
