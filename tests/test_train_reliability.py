"""Faults an operator meets, fed to the scripts: a second trainer on a
workdir, damaged checkpoints, a diverging run, Ctrl-C, and bad workdirs and
flags. Each ends in a resumable run or in one `error:` line (exit 2)."""

import fcntl
import glob
import json
import os
import re
import shutil
import signal

import chex
import numpy as np
import pytest
from hf_fixtures import assert_one_error_line
from test_train_resume import (
    checkpoint_steps,
    final_state,
    logged_steps,
    metrics_lines,
    run,
    script,
    start,
    wait_for,
)

from ftjax.train.loop import _SkipWatch


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed 8-step run (checkpoints 6 and 8) and its final state."""
    d = tmp_path_factory.mktemp("finished") / "run"
    run(str(d), "method=full")
    return d, final_state(str(d))


# ----------------------------------------------------------------------------- one writer


@pytest.mark.slow
def test_second_trainer_on_a_workdir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = start(run_dir)
    try:
        wait_for(first, lambda: metrics_lines(run_dir) >= 1, "a metrics line")
        proc = run(str(run_dir), "method=full", check=False)
        assert_one_error_line(proc, f"locked by pid {first.pid} on host", str(run_dir))
    finally:
        first.kill()
        first.wait(timeout=60)
    # The lock died with its holder.
    with open(run_dir / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ----------------------------------------------------------------------------- damaged checkpoints


def _corrupt(path, how):
    data = open(path, "rb").read()
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[: len(data) // 2]
    else:  # one flipped bit: orbax itself reads it back without complaint
        data = bytearray(data)
        data[len(data) // 2] ^= 0x01
        data = bytes(data)
    with open(path, "wb") as f:
        f.write(data)


def _largest_state_file(run_dir, step):
    files = glob.glob(
        os.path.join(run_dir, "checkpoints", str(step), "state", "**"), recursive=True
    )
    return max((f for f in files if os.path.isfile(f)), key=os.path.getsize)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["empty", "truncated", "flipped"])
def test_damaged_newest_checkpoint_falls_back_to_previous(finished, tmp_path, how):
    src, reference = finished
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    _corrupt(_largest_state_file(run_dir, 8), how)
    proc = run(str(run_dir), "method=full")
    assert re.search(r"checkpoint 8 is damaged \(.+\); skipping it", proc.stdout), proc.stdout
    assert "resumed from checkpoint at step 6" in proc.stdout
    assert (run_dir / "damaged_checkpoints" / "8").is_dir()
    chex.assert_trees_all_equal(final_state(str(run_dir)), reference)
    assert logged_steps(run_dir) == list(range(1, 9))


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_line(finished, tmp_path):
    src, _ = finished
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    for step in (6, 8):
        _corrupt(_largest_state_file(run_dir, step), "flipped")
    proc = run(str(run_dir), "method=full", check=False)
    assert_one_error_line(proc, "no intact checkpoint", "step 8:", "step 6:", "checksum")
    assert checkpoint_steps(run_dir) == [6, 8]  # nothing moved or deleted
    proc = script("evaluate.py", f"--workdir={run_dir}")
    assert_one_error_line(proc, "no intact checkpoint")


# ----------------------------------------------------------------------------- NaN storm


@pytest.mark.slow
def test_diverging_run_stops_with_one_line(tmp_path):
    proc = run(
        str(tmp_path), "method=full", None, "--config.optim.lr=1e6", "--config.train.steps=40",
        check=False,
    )  # fmt: skip
    line = assert_one_error_line(proc, "train.max_consecutive_skips=10", "lower optim.lr")
    first = int(re.search(r"steps (\d+)-(\d+)", line).group(1))
    assert re.search(rf"warning: step {first}: update skipped", proc.stdout), proc.stdout
    assert not (tmp_path / "summary.json").exists()
    # Checkpoints from inside the skipped stretch are not saved.
    assert checkpoint_steps(tmp_path) and all(s < first for s in checkpoint_steps(tmp_path))
    assert f"the last saved is checkpoint {checkpoint_steps(tmp_path)[-1]}" in line


def test_skip_watch_counts_streaks_one_step_behind():
    watch = _SkipWatch(limit=3, skipped=0)
    counts = [0, 1, 2, 2, 3, 4, 5, 6]  # the cumulative counter after steps 1..8
    stops = [watch.push(step, np.int32(c)) for step, c in enumerate(counts, 1)]
    # Step 8's push sees step 7: the third skip in a row (steps 5, 6, 7).
    assert stops == [False] * 7 + [True]
    assert (watch.first, watch.step, watch.streak) == (5, 7, 3)
    assert watch.flush() is True and watch.streak == 4
    never = _SkipWatch(limit=0, skipped=0)
    assert not any(never.push(s, np.int32(s)) for s in range(1, 50)) and not never.flush()


# ----------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for(proc, lambda: checkpoint_steps(run_dir) and metrics_lines(run_dir) >= 3, "a save")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    out, err = (tmp_path / "run.log.out").read_text(), (tmp_path / "run.log.err").read_text()
    assert "Traceback" not in err, err[-3000:]
    step = int(re.search(r"SIGINT: saving a checkpoint at step (\d+)", out).group(1))
    assert f"stopped by SIGINT at step {step}: checkpoint saved" in out
    assert checkpoint_steps(run_dir)[-1] == step
    resumed = run(str(run_dir), "method=full", None, f"--config.train.steps={step + 2}")
    assert f"resumed from checkpoint at step {step}" in resumed.stdout
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


# ----------------------------------------------------------------------------- messages


@pytest.mark.slow
def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    assert_one_error_line(run(str(path), check=False), f"--workdir={path}: is a file")
    for name in ("evaluate.py", "export.py"):
        proc = script(name, f"--workdir={path}", f"--out={tmp_path / 'o'}")
        assert_one_error_line(proc, f"--workdir={path}")


@pytest.mark.slow
def test_warmup_longer_than_the_run(tmp_path):
    proc = run(
        str(tmp_path / "r"), "method=full", None, "--config.optim.warmup_steps=20",
        "--config.train.steps=8", check=False,
    )  # fmt: skip
    assert_one_error_line(proc, "optim.warmup_steps=20", "train.steps=8")
    assert not (tmp_path / "r" / "config.json").exists()


@pytest.mark.slow
def test_export_best_without_best_checkpoint(finished, tmp_path):
    run_dir, _ = finished
    proc = script("export.py", f"--workdir={run_dir}", f"--out={tmp_path}", "--checkpoint=best")
    assert_one_error_line(proc, "--checkpoint=best", "no best checkpoint", "train.best_metric")
    proc = script("export.py", f"--workdir={run_dir}", f"--out={tmp_path}", "--checkpoint=3")
    assert_one_error_line(proc, "--checkpoint=3", "no checkpoint 3 (have [6, 8])")


@pytest.mark.slow
def test_evaluate_base_only_needs_no_checkpoint(finished, tmp_path):
    run_dir, _ = finished
    shutil.copy(run_dir / "config.json", tmp_path / "config.json")
    proc = script("evaluate.py", f"--workdir={tmp_path}", "--base_only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["checkpoint_step"] is None
    proc = script("evaluate.py", f"--workdir={tmp_path}")
    assert_one_error_line(proc, "holds no checkpoint yet")


# ----------------------------------------------------------------------------- metrics.jsonl
