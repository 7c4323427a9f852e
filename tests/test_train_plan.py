"""The planner (ftjax.train.plan): the step it compiles is the one training
runs, its byte accounting follows the shardings, its memory figures move the
way the memory policies say, and bad targets get one line. The TPU-target
compile runs where libtpu is installed (README: "Running on Cloud TPU")."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from hf_fixtures import assert_one_error_line, libtpu_env, run_script

from ftjax.errors import ConfigError
from ftjax.train import plan as plan_lib
from ftjax.train import targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quick(arg="method=lora,rank=4", **changes):
    spec = importlib.util.spec_from_file_location(
        "quick_cfg", os.path.join(ROOT, "experiments", "quick", "train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    for path, value in changes.items():
        section, key = path.split("__")
        cfg[section][key] = value
    return cfg


@pytest.mark.parametrize("mode", ["single", "fsdp", "tensor"])
def test_planner_lowers_the_step_training_runs(mode):
    """Same config -> the same program: the planner's abstract lowering and
    the loop's lowering on real, placed arrays give identical StableHLO."""
    from ftjax.train.parallel import Parallel
    from ftjax.train.state import build_run, step_config

    cfg = _quick(parallel__mode=mode)
    target = targets.resolve_target("cpu:8")
    prepared = plan_lib.prepare(cfg, target)
    planned = prepared.par.lower_train_step(prepared.state, prepared.batch).as_text()

    start = build_run(cfg)
    par = Parallel(mode, start.model, start.tx, step_config(cfg), devices=target.devices)
    b, t = int(cfg.data.batch_size), int(cfg.data.seq_len)
    batch = {
        k: np.zeros((b, t), v.dtype)
        for k, v in prepared.batch.items()  # the pipeline's keys and dtypes
    }
    real = par.lower_train_step(par.place_state(start.state), par.place_batch(batch)).as_text()
    assert planned == real


def test_per_device_bytes_follow_the_shardings():
    """FSDP over 8 devices holds about an eighth of the parameters per
    device; the counts are the leaves' own sizes (closed form)."""
    single = plan_lib.prepare(_quick(), targets.resolve_target("cpu:8")).report
    fsdp = plan_lib.prepare(_quick(parallel__mode="fsdp"), targets.resolve_target("cpu:8"))
    shapes = jax.tree.leaves((fsdp.state.trainable, fsdp.state.frozen))
    full = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in shapes)
    assert single["per_device_bytes"]["params"] == full
    per_device = fsdp.report["per_device_bytes"]["params"]
    assert full / 8 <= per_device < full / 4  # small leaves stay replicated


def test_plan_reports_compiler_memory_and_flops():
    r = plan_lib.plan(_quick(parallel__mode="fsdp"), targets.resolve_target("cpu:8"))
    b = r["per_device_bytes"]
    assert b["total"] >= b["arguments"] > 0 and b["temporaries"] > 0
    assert r["fits"] is True and r["margin_bytes"] == r["memory_capacity_bytes"] - b["total"]
    assert r["compiled_flops_per_device"] > 0
    # Model FLOPs of one step, spread over 8 devices, are of the compiled
    # FLOPs' order (the compiled count adds softmax, norms, the optimizer).
    ratio = r["model_flops_per_step"] / 8 / r["compiled_flops_per_device"]
    assert 0.2 < ratio < 2.0, ratio
    text = plan_lib.format_report(r)
    assert "FITS" in text and "cpu:8" in text


def test_memory_policies_show_in_the_plan():
    """What each remat policy keeps for the backward pass shows in the
    compiler's temporaries: full rematerialization needs the least."""
    temps = {}
    for policy in ("none", "full"):
        cfg = _quick(model__remat=policy, data__batch_size=32)
        cfg.model.init.num_layers = 4
        temps[policy] = plan_lib.plan(cfg, targets.resolve_target("cpu:8"))["per_device_bytes"][
            "temporaries"
        ]
    assert temps["full"] < temps["none"], temps


def test_parse_oom_reads_the_tpu_compiler_message():
    msg = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
        "space hbm. Used 18.52G of 15.75G hbm. Exceeded hbm capacity by 2.77G."
    )
    assert plan_lib.parse_oom(msg) == ("total", int(18.52 * 1024**3), int(15.75 * 1024**3))
    msg = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (25.61G) exceeds available HBM (15.75G)."
    )
    assert plan_lib.parse_oom(msg) == ("temporaries", int(25.61 * 1024**3), int(15.75 * 1024**3))
    assert plan_lib.parse_oom("some other error") is None


@pytest.mark.parametrize(
    "name, chips, topology, hosts",
    [
        ("v5e-8", 8, "2x4", 1),
        ("v5e-16", 16, "4x4", 4),
        ("v5litepod-4", 4, "2x2", 1),
        ("v6e-8", 8, "2x4", 1),
        ("v4-8", 4, "2x2x1", 1),  # v4 and v5p names count TensorCores: 2 per chip
        ("v5p-8", 4, "2x2x1", 1),
        ("v5p-16", 8, "2x2x2", 2),
    ],
)
def test_tpu_names(name, chips, topology, hosts):
    gen, n, topo, h = targets.parse_tpu_name(name)
    assert (n, topo, h) == (chips, topology, hosts)
    assert gen.memory_bytes in (16 * 1024**3, 32 * 1024**3, 95 * 1024**3)


@pytest.mark.parametrize("name", ["v5e-7", "v9-8", "tpu", "v5p-6"])
def test_bad_tpu_names_are_refused(name):
    with pytest.raises(ConfigError, match="--target="):
        targets.parse_tpu_name(name)


def test_work_flops_take_the_larger_count():
    assert plan_lib.work_flops_per_device(10.0, 800.0, 8) == 100.0
    assert plan_lib.work_flops_per_device(500.0, 800.0, 8) == 500.0


def test_roofline_is_the_slower_of_compute_and_memory():
    t = targets.Target("x", (), "tpu", 1, 100.0, 10.0)
    assert plan_lib.roofline_seconds(1000.0, 10.0, t) == 10.0
    assert plan_lib.roofline_seconds(100.0, 1000.0, t) == 100.0
    assert (
        plan_lib.roofline_seconds(1.0, 1.0, targets.Target("c", (), "cpu", 1, None, None)) is None
    )


@pytest.mark.slow
def test_plan_script_writes_json_and_refuses_bad_input(tmp_path):
    out = tmp_path / "plan.json"
    config = os.path.join(ROOT, "experiments", "quick", "train.py") + ":method=lora,rank=4"
    proc = run_script(
        "plan.py", f"--config={config}", "--target=cpu:4", "--config.parallel.mode=fsdp",
        f"--out={out}", check=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["devices"] == 4 and report["mode"] == "fsdp" and report["fits"] is True
    assert "FITS" in proc.stdout
    bad = run_script("plan.py", f"--config={config}", "--target=v5e-7")
    assert_one_error_line(bad, "--target='v5e-7'", "sizes:")
    bad = run_script(
        "plan.py", f"--config={config}", "--target=cpu:4", "--config.data.batch_size=6",
        "--config.parallel.mode=fsdp",
    )  # fmt: skip
    assert_one_error_line(bad, "data.batch_size=6", "4 data-parallel devices")


@pytest.mark.skipif(libtpu_env() is None, reason="needs libtpu (.ci/run installs it in .tpu-site)")
def test_tpu_target_compiles_with_the_tpu_compiler(tmp_path):
    """A TPU slice compiled here, with no TPU: the report is the TPU
    compiler's, for 8 v5e chips of 16 GiB."""
    out = tmp_path / "plan.json"
    config = os.path.join(ROOT, "experiments", "quick", "train.py") + ":method=lora,rank=4"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "plan.py"), f"--config={config}",
         "--target=v5e-8", "--config.parallel.mode=fsdp", f"--out={out}"],
        capture_output=True, text=True, timeout=900, env=libtpu_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["platform"] == "tpu" and report["devices"] == 8
    assert "v5 lite" in report["device_kind"].lower()
    assert report["memory_capacity_bytes"] == 16 * 1024**3 and report["fits"] is True
    assert "Source Location Trace" not in proc.stderr  # libtpu's start-up noise is kept out
