"""Hyperparameter selection as a stage of a study: every row (method) of the
study has its own grid; the grid runs (first seed) are scored on a
validation split of the target data, disjoint from the test prompts; each
row's best point is chosen by the study's rule; the remaining seeds then run
at the chosen values. The grid run at the chosen point is the row's first
seed: it was chosen on validation data only, so its test scores are as
unbiased as the other seeds'.

A study declares it with `get_selection(arg=None)`::

    def get_selection(arg=None):
        return dict(
            rows={"lora r=16": dict(arg="method=lora,rank=16",
                                    grid={"optim.lr": [1e-3, 3e-3, 1e-2]}), ...},
            seeds=[0, 1, 2],
            rule=dict(maximize="final/target_val/exact_match",
                      then_minimize="final/target_val/loss"),
            comparisons=[("full", "lora r=16"), ...],   # what the report tests
        )

The choice is written to `<sweep>/selection.json` (grid, scores, choice,
each row's runs) before any final run starts; it is recomputed from the grid
runs' summaries, so a sweep killed between the stages resumes to the same
choice.
"""

from __future__ import annotations

import math
import os
import re

from ftjax.errors import ConfigError
from ftjax.rundir import RunDir, read_json, write_json_atomic
from ftjax.study.sweep import product

SELECTION_FILE = "selection.json"
# What a rule may read: the validation split's and the training data's own
# numbers. The test prompts (`final/target/...`) and the general sets (the
# forgetting measure) are refused, so no choice can look at what the study reports.
_ALLOWED_RULE_KEYS = re.compile(r"^(final|eval)/target_val/[\w.]+$|^loss$")


def check_selection(sel, origin: str = "get_selection()") -> dict:
    """The study's selection declaration, checked field by field."""
    if not isinstance(sel, dict):
        raise ConfigError(f"{origin}: got {type(sel).__name__}; expected a dict")
    allowed = {"rows", "seeds", "rule", "comparisons"}
    unknown = set(sel) - allowed
    if unknown:
        raise ConfigError(
            f"{origin}: unknown field(s) {sorted(unknown)}; fields: {sorted(allowed)}"
        )
    rows = sel.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise ConfigError(f"{origin}: rows: expected a non-empty dict of label -> row")
    for label, row in rows.items():
        where = f"{origin}: rows[{label!r}]"
        if not isinstance(row, dict) or set(row) - {"arg", "grid"}:
            raise ConfigError(f"{where}: expected a dict with 'arg' and 'grid'")
        grid = row.get("grid") or {}
        if (
            not isinstance(grid, dict)
            or not grid
            or any(not isinstance(v, (list, tuple)) or not v for v in grid.values())
        ):
            raise ConfigError(f"{where}.grid: expected a dict of config path -> non-empty list")
    seeds = sel.get("seeds")
    if not isinstance(seeds, (list, tuple)) or not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{origin}: seeds: expected a non-empty list of distinct ints")
    rule = sel.get("rule") or {}
    if set(rule) - {"maximize", "then_minimize"} or "maximize" not in rule:
        raise ConfigError(f"{origin}: rule: expected {{'maximize': key[, 'then_minimize': key]}}")
    for key in rule.values():
        if not _ALLOWED_RULE_KEYS.match(str(key)):
            raise ConfigError(
                f"{origin}: rule key {key!r}: selection reads the validation split only "
                "(final/target_val/<metric>), never the test or general sets"
            )
    for pair in sel.get("comparisons", []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and set(pair) <= set(rows)):
            raise ConfigError(f"{origin}: comparisons: {pair!r} is not a pair of row labels")
    return sel


def slug(label: str) -> str:
    """A row label as a run-name component (`lora r=16` -> `lora_r=16`)."""
    return re.sub(r"[^\w.=+-]", "_", label)


def point_name(label: str, point: dict, seed) -> str:
    """The run directory name of `label` at grid `point` and `seed`."""
    parts = [slug(label)] + [f"{k.split('.')[-1]}={v}" for k, v in point.items()] + [f"seed={seed}"]
    return ",".join(parts)


def grid_entries(sel: dict) -> list[dict]:
    """The grid stage as sweep entries (override dicts with a `name`), first seed."""
    seed = sel["seeds"][0]
    out = []
    for label, row in sel["rows"].items():
        for point in product(**row["grid"]):
            out.append(_entry(label, row, point, seed))
    return out


def _entry(label, row, point, seed) -> dict:
    arg = ",".join(a for a in (row.get("arg", ""), f"seed={seed}") if a)
    return {"name": point_name(label, point, seed), "arg": arg, "study.label": label, **point}


def score(summary: dict, key: str) -> float | None:
    value = summary.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    return None


def choose(candidates: list[dict], rule: dict) -> int:
    """Index of the best candidate ({"maximize": v, "then_minimize": v}, as
    `select` scores them): highest `maximize`, ties broken by the lowest
    `then_minimize`, then by grid order. Missing scores rank last."""
    neg_inf = -math.inf

    def key(i):
        c = candidates[i]
        first = c.get("maximize")
        second = c.get("then_minimize")
        return (
            -(first if first is not None else neg_inf),
            second if second is not None else math.inf,
            i,
        )

    return min(range(len(candidates)), key=key)


def select(sel: dict, sweep_dir: str) -> dict:
    """Scores every row's grid runs by the rule and chooses; the result (as
    written to selection.json). Raises ConfigError while a grid run is unfinished."""
    rule = sel["rule"]
    rows = {}
    missing = []
    for label, row in sel["rows"].items():
        grid = []
        for point in product(**row["grid"]):
            name = point_name(label, point, sel["seeds"][0])
            run = RunDir(os.path.join(sweep_dir, name))
            if not run.is_finished(evaluated=True):
                missing.append(name)
                continue
            summary = run.read_summary()
            grid.append(
                {
                    "point": point,
                    "run": name,
                    **{k: score(summary, rule[k]) for k in rule},
                }
            )
        if missing:
            continue
        best = choose(grid, rule)
        point = grid[best]["point"]
        runs = [point_name(label, point, s) for s in sel["seeds"]]
        rows[label] = {"arg": row.get("arg", ""), "grid": grid, "chosen": best, "point": point,
                       "runs": runs}  # fmt: skip
    if missing:
        raise ConfigError(
            f"selection: {len(missing)} grid run(s) not finished ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); rerun the sweep to finish them first"
        )
    return {
        "rule": rule,
        "seeds": list(sel["seeds"]),
        "comparisons": [list(p) for p in sel.get("comparisons", [])],
        "rows": rows,
    }


def final_entries(sel: dict, chosen: dict) -> list[dict]:
    """The final stage: every seed but the first at each row's chosen point."""
    out = []
    for label, row in sel["rows"].items():
        point = chosen["rows"][label]["point"]
        for seed in sel["seeds"][1:]:
            out.append(_entry(label, row, point, seed))
    return out


def write_selection(sweep_dir: str, chosen: dict) -> str:
    path = os.path.join(sweep_dir, SELECTION_FILE)
    write_json_atomic(path, chosen, indent=1)
    return path


def read_selection(sweep_dir: str) -> dict | None:
    path = os.path.join(sweep_dir, SELECTION_FILE)
    return read_json(path) if os.path.exists(path) else None
