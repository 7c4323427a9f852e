"""Exact resume after SIGKILL, SIGTERM and a kill during a checkpoint save;
refusal of a workdir holding another run's checkpoint, with nothing written.

The processes are killed from outside once the state a test needs is on disk
(a checkpoint directory, an orbax temporary, a metrics line): the library
has no test hooks. Killed runs are long (LONG steps, constant learning rate),
so the kill always lands mid-run; they are resumed to STEPS steps and compared
with an uninterrupted run of STEPS steps.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import chex
import pytest
from hf_fixtures import run_script, script_cmd, script_env

pytestmark = pytest.mark.slow  # training runs in subprocesses, killed and resumed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "quick", "train.py")
# A classification run (encoder, head, labeled data): arg "classify:<method arg>".
CLASSIFY = os.path.join(ROOT, "experiments", "quick", "classify.py")
STEPS = 16
LONG = "--config.train.steps=100000"
# The lr schedule then does not depend on train.steps, so a run stopped early and
# one configured shorter see the same learning rates.
CONSTANT_LR = ("--config.optim.schedule=constant",)
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def train_cmd(workdir, arg="method=full", *extra):
    config = CONFIG
    if arg.startswith("classify:"):
        config, arg = CLASSIFY, arg.removeprefix("classify:")
    return script_cmd("train.py", f"--config={config}:{arg}", f"--workdir={workdir}", *extra)


def run(workdir, arg="method=full", env_extra=None, *extra, check=True):
    proc = subprocess.run(
        train_cmd(workdir, arg, *extra),
        env=script_env(**(env_extra or {})),  # one device: bit-exact across processes
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


script = run_script


def start(workdir, arg="method=full", *extra):
    """A long run in the background (its output goes to files in its parent dir)."""
    log = os.path.join(os.path.dirname(str(workdir)), f"{os.path.basename(str(workdir))}.log")
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        return subprocess.Popen(
            train_cmd(workdir, arg, LONG, *CONSTANT_LR, *extra),
            env=script_env(),
            stdout=out,
            stderr=err,
            text=True,
        )


def wait_for(proc, predicate, what, timeout=300):
    """Polls until `predicate()` holds; fails if the process ends first."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended ({proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def checkpoint_steps(workdir):
    """Steps of the complete checkpoints (orbax renames a finished save into place)."""
    d = os.path.join(str(workdir), "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def temporaries(workdir):
    d = os.path.join(str(workdir), "checkpoints")
    return [n for n in os.listdir(d) if TMP_SUFFIX in n] if os.path.isdir(d) else []


def logged_steps(workdir):
    """Steps of the training records in metrics.jsonl (eval-only records aside)."""
    with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


def metrics_lines(workdir):
    path = os.path.join(str(workdir), "metrics.jsonl")
    return open(path).read().count("\n") if os.path.exists(path) else 0


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
    """reference(arg): the final state of an uninterrupted STEPS-step run."""
    cache = {}

    def get(arg):
        if arg not in cache:
            d = str(tmp_path_factory.mktemp("ref"))
            run(d, arg, None, f"--config.train.steps={STEPS}", *CONSTANT_LR)
            cache[arg] = final_state(d)
        return cache[arg]

    return get


def resume_and_compare(reference, workdir, arg, resumed_from):
    resumed = run(str(workdir), arg, None, f"--config.train.steps={STEPS}", *CONSTANT_LR)
    assert f"resumed from checkpoint at step {resumed_from}" in resumed.stdout
    step, state = final_state(str(workdir))
    assert step == STEPS
    chex.assert_trees_all_equal((step, state), reference(arg))
    # The steps the killed run logged after its checkpoint were dropped, not repeated.
    assert logged_steps(workdir) == list(range(1, STEPS + 1))


@pytest.mark.parametrize(
    "arg", ["method=full", "method=lora,rank=4", "classify:method=lora,rank=4"]
)
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, arg):
    proc = start(tmp_path / "run", arg)
    wait_for(proc, lambda: 4 in checkpoint_steps(tmp_path / "run"), "checkpoint 4")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "run" / "summary.json")
    latest = checkpoint_steps(tmp_path / "run")[-1]
    assert 4 <= latest < STEPS
    resume_and_compare(reference, tmp_path / "run", arg, latest)


def test_sigterm_saves_and_resumes_bit_identical(reference, tmp_path):
    proc = start(tmp_path / "run")
    wait_for(proc, lambda: metrics_lines(tmp_path / "run") >= 3, "3 metrics lines")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, (tmp_path / "run.log.err").read_text()[-2000:]
    assert "SIGTERM: saving a checkpoint" in (tmp_path / "run.log.out").read_text()
    step = checkpoint_steps(tmp_path / "run")[-1]
    assert 3 <= step < STEPS
    resume_and_compare(reference, tmp_path / "run", "method=full", step)


def test_kill_during_save_resumes_from_previous_checkpoint(reference, tmp_path):
    """SIGKILL while orbax writes a checkpoint into its temporary directory: the
    temporary is ignored (and cleaned up), the previous checkpoint resumed."""
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for(
        proc,
        lambda: checkpoint_steps(run_dir) and temporaries(run_dir),
        "a save in flight after a complete checkpoint",
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = temporaries(run_dir)
    if not left:  # the save finished between the poll and the kill: leave a torn one
        latest = checkpoint_steps(run_dir)[-1]
        torn = run_dir / "checkpoints" / f"{latest + 2}{TMP_SUFFIX}"
        shutil.copytree(run_dir / "checkpoints" / str(latest), torn)
        for root, _, files in os.walk(torn / "state"):
            for name in files:
                os.truncate(os.path.join(root, name), 0)
        left = temporaries(run_dir)
    assert left
    previous = checkpoint_steps(run_dir)[-1]
    resume_and_compare(reference, run_dir, "method=full", previous)
    assert not temporaries(run_dir)


def test_refused_resume_writes_nothing(tmp_path):
    """A LoRA workdir resumed as full fine-tuning is refused before anything
    is written: the intact run still exports."""
    run(str(tmp_path), "method=lora,rank=4", None, "--config.train.steps=2")
    before = {n: (tmp_path / n).read_bytes() for n in ("config.json", "metrics.jsonl")}
    proc = run(
        str(tmp_path), "method=full", None, "--config.train.steps=4",
        "--config.train.tensorboard=true", check=False,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1].startswith("error:") and "different method" in lines[-1]
    assert "fresh --workdir" in lines[-1] and "Traceback" not in proc.stderr
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not (tmp_path / "tensorboard").exists()
    proc = script("export.py", f"--workdir={tmp_path}", f"--out={tmp_path / 'export'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").exists()


def test_bad_flag_values_give_one_line(tmp_path):
    proc = run(str(tmp_path), "method=full", None, "--config.optim.name=adamz", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: optim.name='adamz'")
    proc = run(str(tmp_path / "b"), "method=full", None, "--config.parallel.mode=ddp", check=False)
    assert proc.returncode == 2 and "parallel.mode='ddp'" in proc.stderr
    for arg, extra, expected in [
        ("method=full", "--config.train.stepz=3", "no field 'stepz'"),
        ("method=lroa", "--config.train.steps=3", "error: method='lroa'; expected one of "),
        ("method=lora,rank=0", "--config.train.steps=3", "error: method.rank: must be a positive"),
    ]:
        proc = run(str(tmp_path / "c"), arg, None, extra, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and expected in lines[-1], proc.stderr[-500:]
        assert not any(line.startswith("Traceback") for line in lines)
