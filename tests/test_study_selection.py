"""Selection as a stage of a sweep (runs stubbed: each writes the summary a
rule reads): the grid runs first, each row's choice reads only the
validation split, the final seeds run at the chosen point, and a sweep
stopped between the stages resumes to the same choice."""

import io
import json
import os

import pytest

from ftjax.errors import ConfigError
from ftjax.rundir import RunDir
from ftjax.study.runner import run_sweep
from ftjax.study.selection import (
    check_selection,
    choose,
    point_name,
    read_selection,
)

# Validation and test disagree on purpose: validation favours lr 0.01 for
# "b", test favours 0.1; a selection that looked at the test would pick 0.1.
VAL = {("a", 0.01): 0.5, ("a", 0.1): 0.9, ("b", 0.01): 0.8, ("b", 0.1): 0.6}
TEST = {("a", 0.01): 0.4, ("a", 0.1): 0.7, ("b", 0.01): 0.3, ("b", 0.1): 0.95}

STUDY = """
from ftjax.data import source_config
from ftjax.train import default_config

def get_config(arg=None):
    cfg = default_config()
    cfg.data.tokenizer = "tok"
    cfg.data.sources.target = source_config("train.jsonl")
    cfg.study = dict(label="")
    seed = dict(kv.split("=") for kv in (arg or "").split(",") if kv).get("seed", "0")
    cfg.train.seed = int(seed)
    return cfg

def get_selection(arg=None):
    return dict(
        rows={
            "a": dict(arg="", grid={"optim.lr": [0.01, 0.1]}),
            "b": dict(arg="", grid={"optim.lr": [0.01, 0.1]}),
        },
        seeds=[0, 1, 2],
        rule=dict(maximize="final/target_val/exact_match", then_minimize="final/target_val/loss"),
        comparisons=[("a", "b")],
    )
"""


@pytest.fixture()
def study(tmp_path):
    path = tmp_path / "study.py"
    path.write_text(STUDY)
    return str(path)


def _fake_run(log, fail_on=None):
    def run_one(spec, run_dir, cores=None):
        if spec.name == fail_on:
            raise RuntimeError(f"killed: {spec.name}")
        log.append(spec.name)
        label, lr, seed = spec.config.study.label, spec.config.optim.lr, spec.config.train.seed
        summary = {
            "status": "completed",
            "evaluated": True,
            "final/target_val/exact_match": VAL[(label, lr)],
            "final/target_val/loss": 1.0,
            "final/target/exact_match": TEST[(label, lr)] + 0.01 * seed,
        }
        RunDir(run_dir).write_summary(summary)
        return summary

    return run_one


def test_grid_then_choice_on_validation_then_final_seeds(study, tmp_path):
    log, out = [], io.StringIO()
    work = str(tmp_path / "w")
    run_sweep(study, work, _fake_run(log), out=out)
    grid = [point_name(r, {"optim.lr": lr}, 0) for r in "ab" for lr in (0.01, 0.1)]
    assert log[:4] == grid
    chosen = read_selection(work)
    # "a": 0.1 is best on validation; "b": 0.01, although the test prefers 0.1.
    assert chosen["rows"]["a"]["point"] == {"optim.lr": 0.1}
    assert chosen["rows"]["b"]["point"] == {"optim.lr": 0.01}
    assert sorted(log[4:]) == sorted(
        [
            "a,lr=0.1,seed=1",
            "a,lr=0.1,seed=2",
            "b,lr=0.01,seed=1",
            "b,lr=0.01,seed=2",
        ]
    )
    # The first seed of each row is its chosen grid run.
    assert chosen["rows"]["b"]["runs"] == [f"b,lr=0.01,seed={s}" for s in (0, 1, 2)]
    text = out.getvalue()
    assert "stage grid: 4 run(s)" in text and "stage final: 4 run(s)" in text
    # Rerun: everything is finished, nothing runs again.
    again = []
    run_sweep(study, work, _fake_run(again), out=io.StringIO())
    assert again == []


def test_sweep_stopped_between_stages_resumes_to_the_same_choice(study, tmp_path):
    work = str(tmp_path / "w")
    log = []
    with pytest.raises(RuntimeError, match="killed"):
        run_sweep(study, work, _fake_run(log, fail_on="a,lr=0.1,seed=1"), out=io.StringIO())
    assert len(log) == 4 and "a,lr=0.1,seed=1" not in log  # the grid finished, no final
    first = read_selection(work)
    rest = []
    run_sweep(study, work, _fake_run(rest), out=io.StringIO())
    assert "a,lr=0.1,seed=1" in rest and not set(rest) & set(log[:4])  # the grid is skipped
    assert read_selection(work) == first


def test_emit_commands_prints_finals_only_once_chosen(study, tmp_path):
    work = str(tmp_path / "w")
    out = io.StringIO()
    run_sweep(study, work, _fake_run([]), emit="commands", out=out)
    lines = out.getvalue().splitlines()
    assert len([ln for ln in lines if "--only=" in ln]) == 4
    assert lines[-1].startswith("# then, once these have finished")
    run_sweep(study, work, _fake_run([]), out=io.StringIO())
    out = io.StringIO()
    run_sweep(study, work, _fake_run([]), emit="commands", out=out)
    only = [ln for ln in out.getvalue().splitlines() if "--only=" in ln]
    assert len(only) == 8 and any("b,lr=0.01,seed=2" in ln for ln in only)


def test_selection_file_is_json_with_the_grid_scores(study, tmp_path):
    work = str(tmp_path / "w")
    run_sweep(study, work, _fake_run([]), out=io.StringIO())
    with open(os.path.join(work, "selection.json")) as f:
        data = json.load(f)
    grid = data["rows"]["a"]["grid"]
    assert [g["maximize"] for g in grid] == [VAL[("a", 0.01)], VAL[("a", 0.1)]]
    assert data["comparisons"] == [["a", "b"]]


@pytest.mark.parametrize(
    "key",
    ["final/target/exact_match", "final/general/exact_match", "forgetting/general/loss_increase"],
)
def test_a_rule_may_not_read_the_test_or_general_sets(key):
    sel = dict(
        rows={"a": dict(arg="", grid={"optim.lr": [1.0]})}, seeds=[0], rule={"maximize": key}
    )
    with pytest.raises(ConfigError, match="selection reads the validation split only"):
        check_selection(sel)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(rows={}), "rows: expected a non-empty dict"),
        (dict(rows={"a": dict(arg="", grid={})}), r"rows\['a'\].grid"),
        (dict(rows={"a": dict(arg="", grid={"optim.lr": [1]}, lr=2)}), r"rows\['a'\]: expected"),
        (dict(rows={"a": dict(arg="", grid={"optim.lr": [1]})}, seeds=[0, 0]), "seeds"),
        (dict(rows={"a": dict(grid={"optim.lr": [1]})}, seeds=[0], extra=1), "unknown field"),
    ],
)
def test_bad_selection_declarations_name_the_field(bad, message):
    bad.setdefault("seeds", [0])
    bad.setdefault("rule", {"maximize": "final/target_val/exact_match"})
    with pytest.raises(ConfigError, match=message):
        check_selection(bad)


def test_choose_breaks_ties_then_keeps_grid_order():
    cands = [
        {"maximize": 0.9, "then_minimize": 2.0},
        {"maximize": 0.9, "then_minimize": 1.0},
        {"maximize": None, "then_minimize": 0.1},
        {"maximize": 0.5, "then_minimize": 0.1},
    ]
    assert choose(cands, {}) == 1
    assert choose([{"maximize": 0.0}, {"maximize": 0.0}], {}) == 0
    assert choose([{"maximize": None}, {"maximize": 0.0}], {}) == 1
