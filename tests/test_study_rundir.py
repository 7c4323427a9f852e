"""The run directory: round trips of every file, merges, metrics truncation on
resume, what a sweep or a report takes for a finished run, and crash safety
(a process killed while writing never leaves a torn or half-finished run)."""

import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax.errors import RunDirError
from ftjax.rundir import json_default
from ftjax.study import RunDir, is_finished, load_runs

RUNDIR_PY = inspect.getsourcefile(RunDir)  # the writer subprocess loads it by path


def test_config_round_trip(tmp_path):
    cfg = ml_collections.ConfigDict({"optim": {"lr": 3e-4, "schedule": "cosine"}, "steps": 5})
    run = RunDir(tmp_path / "new" / "run")  # the first write creates the directory
    run.write_config(cfg)
    back = run.read_config()
    assert isinstance(back, ml_collections.ConfigDict)
    assert back.optim.lr == 3e-4 and back.optim.schedule == "cosine" and back.steps == 5
    assert run.read_config_dict() == cfg.to_dict()
    with pytest.raises(RunDirError, match=r"config.json: no run config"):
        RunDir(tmp_path).read_config()
    with pytest.raises(RunDirError, match=r"not a directory"):
        RunDir(tmp_path / "missing").read_config()


def test_summary_merge_and_json_of_numpy_and_jax_scalars(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_summary() == {} and not run.is_finished()
    run.write_summary({"status": "completed", "steps": np.int64(4), "loss": np.float32(0.5)})
    merged = run.update_summary(
        {"final/target/loss": jnp.float32(1.25), "extra/x": float("nan")}, role="prerequisite"
    )
    on_disk = run.read_summary()
    assert on_disk == merged or math.isnan(on_disk["extra/x"])
    assert on_disk["steps"] == 4 and isinstance(on_disk["steps"], int)
    assert on_disk["final/target/loss"] == 1.25 and on_disk["role"] == "prerequisite"
    assert on_disk["loss"] == 0.5 and math.isnan(on_disk["extra/x"])
    assert json_default(np.arange(3)) == [0, 1, 2] and json_default(jnp.int32(7)) == 7
    run.write_eval({"final/t/exact_match": np.float64(0.5)})
    assert run.read_eval() == {"final/t/exact_match": 0.5}


def test_is_finished_and_evaluated(tmp_path):
    run = RunDir(tmp_path)
    run.write_summary({"status": "preempted"})
    assert not run.is_finished()
    run.write_summary({"status": "completed"})
    assert run.is_finished() and is_finished(tmp_path)
    assert not run.is_finished(evaluated=True)  # trained, evaluation not merged yet
    run.update_summary(evaluated=True)
    assert is_finished(tmp_path, evaluated=True)
    # A run evaluated before the mark existed: its summary holds final/ metrics.
    run.write_summary({"status": "completed", "final/target/loss": 1.0})
    assert run.is_finished(evaluated=True)


def test_torn_files(tmp_path):
    """What a kill leaves: a temporary file cut short beside (or instead of)
    the real one never makes a run look finished or unreadable; a damaged
    summary.json (not written by RunDir) is an error naming the file."""
    run = RunDir(tmp_path / "run")
    os.makedirs(run.path)
    with open(run.file("summary.json.tmp4242"), "w") as f:
        f.write('{"status": "completed", "ste')
    assert not run.is_finished() and run.read_summary() == {}
    assert load_runs(tmp_path) == []
    run.write_summary({"status": "preempted"})
    assert not run.is_finished() and load_runs(tmp_path) == []
    with open(run.file("summary.json"), "w") as f:
        f.write('{"status": "compl')
    with pytest.raises(RunDirError, match=r"summary.json: not valid JSON"):
        run.read_summary()


def test_a_failed_write_keeps_the_old_file(tmp_path):
    class Unwritable:
        def tolist(self):
            raise RuntimeError("cannot encode")

    run = RunDir(tmp_path)
    run.write_summary({"status": "completed", "steps": 3})
    with pytest.raises(RuntimeError, match="cannot encode"):
        run.update_summary({"bad": Unwritable()})
    assert run.read_summary() == {"status": "completed", "steps": 3}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]  # no stray temporary file


_WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("rundir", sys.argv[1])
rundir = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rundir)
run = rundir.RunDir(sys.argv[2])
i = 0
while True:
    run.write_summary({"status": "completed", "i": i, "pad": "x" * 400000})
    i += 1
"""


def test_killed_writer_never_leaves_a_torn_summary(tmp_path):
    """SIGKILL a process rewriting summary.json in a loop, at several moments:
    the file that remains is always a whole summary."""
    for k in range(4):
        d = tmp_path / f"run{k}"
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, RUNDIR_PY, str(d)])
        try:
            deadline = time.time() + 60
            while not (d / "summary.json").exists():
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.005)
            time.sleep(0.01 * k)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        summary = RunDir(d).read_summary()
        assert summary["status"] == "completed" and len(summary["pad"]) == 400000
        assert is_finished(d)


def test_metrics_append_read_and_truncate_on_resume(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics() == [] and run.truncate_metrics_after(3) == 0
    run.append_metrics({"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4))
    run.append_metrics([{"step": 5, "loss": np.float32(0.2)}])
    with open(run.file("metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-line
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 5]  # the torn line skipped
    # Resumed from the checkpoint at step 3: steps 4-6 will be replayed.
    assert run.truncate_metrics_after(3) == 3
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    run.append_metrics([{"step": 4, "loss": 0.3}])
    lines = open(run.file("metrics.jsonl")).read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_load_runs_takes_completed_runs_only(tmp_path):
    def make(name, summary, curve=(), config=None):
        run = RunDir(tmp_path / name)
        if config is not None:
            run.write_config(config)
        run.append_metrics(curve)
        if summary is not None:
            run.write_summary(summary)

    make("b", {"status": "completed", "lr": 0.1}, [{"step": 1, "loss": 2.0}], {"seed": 1})
    make("a", {"status": "completed"})
    make("base", {"status": "completed", "role": "prerequisite"})
    make("crashed", {"status": "preempted"})
    make("started", None, [{"step": 1, "loss": 3.0}])
    (tmp_path / "report.md").write_text("not a run")
    runs = load_runs(tmp_path)
    assert [r["name"] for r in runs] == ["a", "b"]
    b = runs[1]
    assert b["dir"] == str(tmp_path / "b") and b["summary"]["lr"] == 0.1
    assert b["config"] == {"seed": 1} and b["curve"] == [{"step": 1, "loss": 2.0}]
    assert runs[0]["config"] == {} and runs[0]["curve"] == []
    with pytest.raises(RunDirError, match=r"not a directory"):
        load_runs(tmp_path / "nope")
