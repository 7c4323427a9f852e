"""The Ray sweep backend on a local Ray cluster (started by the sweep on
this machine's CPUs): its runs give the local backend's numbers, a killed
driver's rerun skips finished runs and resumes the rest, and a run whose Ray
worker is killed mid-run is retried and resumes from its checkpoint, ending
with the uninterrupted results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from hf_fixtures import ROOT, script_cmd, script_env

pytestmark = pytest.mark.slow
pytest.importorskip("ray")

STUDY = os.path.join(ROOT, "tests", "ray_study.py")
RUNS = ["method=full", "method=lora,rank=4", "method=dora,rank=4"]
COMPARED = ("final/", "base/", "forgetting/", "eval/")


def sweep_cmd(workdir, *extra):
    return script_cmd("sweep.py", f"--config={STUDY}", f"--workdir={workdir}", "--quiet",
                      "--progress_every=0", *extra)  # fmt: skip


def finished(run_dir) -> bool:
    path = os.path.join(str(run_dir), "summary.json")
    if not os.path.exists(path):
        return False
    try:
        s = json.load(open(path))
    except ValueError:
        return False
    return s.get("status") == "completed" and (s.get("evaluated") or s.get("role"))


def numbers(run_dir) -> dict:
    s = json.load(open(os.path.join(str(run_dir), "summary.json")))
    return {k: v for k, v in s.items() if k.startswith(COMPARED)}


def wait_for(proc, predicate, what, timeout=600):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended ({proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def run_processes(name: str) -> list[tuple[int, int]]:
    """(pid, parent pid) of the processes running run `name` of this sweep."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        if b"ftjax.study.runner" in cmd and f"--only={name}".encode() in cmd:
            out.append((int(pid), int(stat.rsplit(")", 1)[1].split()[1])))
    return out


def checkpoints(run_dir) -> list[int]:
    d = os.path.join(str(run_dir), "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    d = tmp_path_factory.mktemp("local")
    proc = subprocess.run(sweep_cmd(d, "--jobs=2"), env=script_env(), capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


FORGETTING = os.path.join(ROOT, "experiments", "forgetting", "study.py")


def test_quick_forgetting_study_on_ray_equals_local_and_stops_on_sigterm(tmp_path):
    """The quick forgetting study (prerequisite, grid, selection, final seeds)
    on the Ray backend, its driver sent SIGTERM mid-sweep (the runs in flight
    stop at a checkpoint) and rerun: every run's numbers equal the local
    backend's."""
    cmd = lambda d, *extra: script_cmd("sweep.py", f"--config={FORGETTING}:quick=1",
                                       f"--workdir={d}", "--quiet", "--progress_every=0", *extra)  # fmt: skip
    local = subprocess.run(cmd(tmp_path / "local", "--jobs=2"), env=script_env(),
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]
    d = tmp_path / "ray"
    driver = subprocess.Popen(cmd(d, "--backend=ray"), env=script_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    names = [n for n in os.listdir(tmp_path / "local") if finished(tmp_path / "local" / n)]
    wait_for(driver, lambda: finished(d / "base") and any(
        (d / n / "metrics.jsonl").exists() for n in names if n != "base"), "a run started")  # fmt: skip
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=300)
    assert "SIGTERM: stopping the runs at a checkpoint" in out
    assert driver.returncode == 75, out[-2000:]  # PREEMPTED_EXIT: rerun to resume
    again = subprocess.run(cmd(d, "--backend=ray"), env=script_env(), capture_output=True,
                           text=True, timeout=900)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:]
    assert "base: finished, skipped" in again.stdout
    assert sorted(n for n in os.listdir(d) if finished(d / n)) == sorted(names)
    for n in names:
        assert numbers(d / n) == numbers(tmp_path / "local" / n), n


def test_ray_sweep_survives_driver_and_worker_kills_with_the_local_results(local, tmp_path):
    d = tmp_path / "ray"
    log = open(tmp_path / "driver1.log", "w")
    driver = subprocess.Popen(sweep_cmd(d, "--backend=ray", "--max_retries=2"), env=script_env(),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    # 1. The driver dies (SIGKILL, no clean-up) once the base and a run are done.
    wait_for(driver, lambda: finished(d / "base") and any(finished(d / r) for r in RUNS),
             "the base and one run finished")  # fmt: skip
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local cluster it started
    driver.wait(timeout=60)
    done_before = {r for r in RUNS if finished(d / r)}
    deadline = time.time() + 120  # runs left behind checkpoint on SIGTERM and exit
    while any(run_processes(r) for r in RUNS) and time.time() < deadline:
        time.sleep(0.2)
    for r in RUNS:
        for pid, _ in run_processes(r):
            os.kill(pid, signal.SIGKILL)

    # 2. Rerun: finished runs are skipped; a Ray worker is killed mid-run.
    driver = subprocess.Popen(sweep_cmd(d, "--backend=ray", "--max_retries=2"), env=script_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)  # fmt: skip
    pending = [r for r in RUNS if r not in done_before]
    victim = {}

    def mid_run():
        for r in pending:
            procs = run_processes(r)
            if procs and checkpoints(d / r) and checkpoints(d / r)[-1] < 150:
                victim.update(name=r, worker=procs[0][1], step=checkpoints(d / r)[-1])
                return True
        return False

    wait_for(driver, mid_run, "a resumed run with a checkpoint")
    os.kill(victim["worker"], signal.SIGKILL)  # the Ray worker running the run's task
    out, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, out[-3000:]
    for r in done_before:
        assert f"{r}: finished, skipped" in out
    assert "base: finished, skipped" in out
    run_log = open(d / victim["name"] / "run.log").read()
    assert run_log.count("resumed from checkpoint at step") >= 1, run_log[-2000:]

    # 3. Every run's numbers equal the local backend's.
    for r in ["base"] + RUNS:
        assert finished(d / r), r
        assert numbers(d / r) == numbers(local / r), r


def test_two_host_run_starts_as_a_gang_and_matches_one_process(tmp_path, monkeypatch):
    """A run whose config asks for 2 hosts, on a Ray cluster of two 1-CPU
    nodes: one process per node, joined by jax.distributed (gloo), the
    global batch split between them; its numbers equal one process's."""
    from ray.cluster_utils import Cluster

    study = os.path.join(ROOT, "tests", "ray_gang_study.py")
    cmd = lambda d, *extra: script_cmd("sweep.py", f"--config={study}", f"--workdir={d}",
                                       "--quiet", "--progress_every=0", *extra)  # fmt: skip
    # One process on one core: each Ray node of the gang gives its processes one.
    one = subprocess.run(cmd(tmp_path / "one"), env=script_env(), capture_output=True, text=True,
                         timeout=600, preexec_fn=lambda: os.sched_setaffinity(0, {0}))  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    # The nodes' workers inherit this environment: one CPU device per process.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        gang = subprocess.run(cmd(tmp_path / "gang", "--backend=ray",
                                  f"--ray_address={cluster.address}"),
                              env=script_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    finally:
        cluster.shutdown()
    assert gang.returncode == 0, gang.stderr[-3000:]
    name = "method=lora,rank=4"
    log = open(tmp_path / "gang" / name / "run.log").read()
    assert "Rank 1 is connected to 1 peer ranks" in log  # two processes joined
    a, b = numbers(tmp_path / "one" / name), numbers(tmp_path / "gang" / name)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
