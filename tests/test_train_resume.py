"""Exact resume after SIGKILL, SIGTERM and a kill during a checkpoint save;
refusal of a workdir holding another run's checkpoint."""

import os
import signal
import subprocess
import sys
import time

import chex
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "quick", "train.py")


# The lr schedule then does not depend on train.steps, so a run stopped early and
# one configured shorter see the same learning rates.
CONSTANT_LR = ("--config.optim.schedule=constant",)


def train_cmd(workdir, arg="method=full", *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "scripts", "train.py"),
        f"--config={CONFIG}:{arg}",
        f"--workdir={workdir}",
        *extra,
    ]


def run(workdir, arg="method=full", env_extra=None, *extra, check=True):
    env = {**os.environ, **(env_extra or {})}
    env.pop("XLA_FLAGS", None)  # one device: bit-exact comparisons across processes
    proc = subprocess.run(
        train_cmd(workdir, arg, *extra), env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def final_state(workdir):
    """The last checkpoint's saved arrays, read back through orbax."""
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta"))
    step = mgr.latest_step()
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mgr.close()
    return step, state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = {}
    for arg in ("method=full", "method=lora,rank=4"):
        d = tmp_path_factory.mktemp("ref")
        run(str(d), arg)
        out[arg] = final_state(str(d))
    return out


@pytest.mark.parametrize("arg", ["method=full", "method=lora,rank=4"])
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, arg):
    proc = run(str(tmp_path), arg, {"FTJAX_TEST_KILL_AT_STEP": "5"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "summary.json")
    resumed = run(str(tmp_path), arg)
    assert "resumed from checkpoint at step" in resumed.stdout
    step, state = final_state(str(tmp_path))
    ref_step, ref_state = reference[arg]
    assert step == ref_step == 8
    chex.assert_trees_all_equal(state, ref_state)


def test_sigterm_saves_and_resumes_bit_identical(reference, tmp_path):
    env = {**os.environ}
    env.pop("XLA_FLAGS", None)
    # Slow steps down so SIGTERM lands mid-run, after the first steps.
    proc = subprocess.Popen(
        train_cmd(str(tmp_path), "method=full", "--config.train.steps=400", *CONSTANT_LR),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: saving a checkpoint" in out
    step, _ = final_state(str(tmp_path))
    assert 3 <= step < 400
    # Resume with the reference's step count: same end state as an uninterrupted run.
    ref = tmp_path / "ref"
    run(str(ref), "method=full", None, f"--config.train.steps={step + 3}", *CONSTANT_LR)
    run(str(tmp_path), "method=full", None, f"--config.train.steps={step + 3}", *CONSTANT_LR)
    chex.assert_trees_all_equal(final_state(str(tmp_path)), final_state(str(ref)))


def test_kill_during_save_resumes_from_previous_checkpoint(reference, tmp_path):
    proc = run(str(tmp_path), "method=full", {"FTJAX_TEST_KILL_DURING_SAVE": "4"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    ckpts = os.listdir(tmp_path / "checkpoints")
    assert "2" in ckpts  # the previous checkpoint is complete
    resumed = run(str(tmp_path), "method=full")
    assert "resumed from checkpoint at step 2" in resumed.stdout
    step, state = final_state(str(tmp_path))
    chex.assert_trees_all_equal((step, state), reference["method=full"])


def test_workdir_of_another_method_is_refused(reference, tmp_path):
    run(str(tmp_path), "method=full", None, "--config.train.steps=2")
    proc = run(str(tmp_path), "method=lora,rank=4", None, "--config.train.steps=4", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "different method" in last and "fresh --workdir" in last


def test_bad_flag_values_give_one_line(tmp_path):
    proc = run(str(tmp_path), "method=full", None, "--config.optim.name=adamz", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: optim.name='adamz'")
    proc = run(str(tmp_path / "b"), "method=full", None, "--config.parallel.mode=ddp", check=False)
    assert proc.returncode == 2 and "parallel.mode='ddp'" in proc.stderr
    for arg, extra, expected in [
        ("method=full", "--config.train.stepz=3", "field the config does not have: 'stepz'"),
        ("method=lroa", "--config.train.steps=3", "error: method='lroa'; expected one of full"),
        ("method=lora,rank=0", "--config.train.steps=3", "error: method.rank: must be a positive"),
    ]:
        proc = run(str(tmp_path / "c"), arg, None, extra, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and expected in lines[-1], proc.stderr[-500:]
        assert not any(line.startswith("Traceback") for line in lines)
