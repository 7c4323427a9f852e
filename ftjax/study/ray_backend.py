"""Run a sweep's runs on a Ray cluster: the same study file, run names, run
directories and per-run command as the local runner, each run a Ray task
with the resources its config asks for.

    python scripts/sweep.py --config=experiments/forgetting/study.py --workdir=/shared/runs \\
        --backend=ray [--ray_address=auto] [--max_retries=3]

How it maps onto the local runner (`ftjax.study.runner`):

- A run is the process `python -m ftjax.study.runner --only=<run>` the
  local runner starts, here started by a Ray task on whichever node Ray
  picks, with its output in `<run>/run.log`. The sweep directory must be on
  a filesystem every node mounts (NFS, GCS FUSE, a TPU VM's shared disk):
  it stays the one record of what is finished, so rerunning the sweep after
  the driver died skips finished runs and resumes the others.
- Resources: the run config's optional `resources` section
  (`RESOURCE_DEFAULTS`): CPUs, GPUs and TPU chips per host, and hosts. A
  run of several hosts is a gang: a placement group with one bundle per
  host, one task per bundle, all started together, each told the
  coordinator address, process count and its index for
  `jax.distributed.initialize` (`FTJAX_COORDINATOR_ADDRESS`, ...). On Cloud
  TPU, `tpu_version` and `tpu_topology` (e.g. `v4`, `2x2x2`) reserve one
  whole slice (`ray.util.tpu.slice_placement_group`), one task per host of
  it; JAX then reads the slice's own environment, so such a config sets
  `parallel.distributed=True`. A prerequisite (the base model) runs alone and takes a
  whole node's CPUs, as the local runner gives it every core; it finishes
  before any run that reads it starts.
- At most the cluster's capacity of runs is in flight (the local runner's
  `jobs`, from `ray.cluster_resources()`), and each run is pinned to as
  many of its node's cores as it asked for (claimed with a lock file per
  core, released when the task ends), so XLA sizes its thread pool as for a
  local run with the same share: the same seeds and thread counts give the
  same numbers as the local backend.
- Failures: a task whose worker or node dies (preemption, OOM kill) is
  retried up to `max_retries` times, and so is a run that stopped at a
  checkpoint on SIGTERM; a retried run resumes from its last checkpoint,
  after waiting for its killed predecessor to release the run directory's
  lock. A run that fails by itself (bad config, a bug) is not retried: its
  error ends the sweep as it does locally.
- Ctrl-C or SIGTERM to the driver writes a stop file in the sweep directory
  (which every node sees); each task then passes SIGTERM to its run, which
  checkpoints and exits, tasks not yet started end at once, and the driver
  exits once they have (`ray.cancel` cannot interrupt a task blocked on its
  child process, so it is not used).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time

from ftjax.errors import ConfigError
from ftjax.study.runner import CPUS_ENV, PARENT_ENV, PREEMPTED_EXIT, Preempted, RunFailed
from ftjax.train.config import RESOURCE_DEFAULTS, run_resources  # noqa: F401  (re-exported)
from ftjax.train.loop import GANG_ENV

CORE_LOCKS = os.path.join(tempfile.gettempdir(), "ftjax-ray-cores")


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--backend=ray needs Ray: pip install 'ftjax[ray]' (or ray>=2.60)"
        ) from None
    return ray


# ----------------------------------------------------------------------------- on a worker


def claim_cores(n: int) -> tuple[list[int], list[int]]:
    """(core ids, lock fds): `n` of this node's cores that no other ftjax task
    holds, locked until the fds close (a dead task's locks go with it)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus or n >= len(cpus):
        return [], []
    os.makedirs(CORE_LOCKS, exist_ok=True)
    deadline = time.time() + 60
    while True:
        held, fds = [], []
        for c in cpus:
            fd = os.open(os.path.join(CORE_LOCKS, str(c)), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append(c)
            fds.append(fd)
            if len(held) == n:
                return held, fds
        for fd in fds:
            os.close(fd)
        if time.time() > deadline:  # Ray scheduled more than the cores allow: share them
            return [], []
        time.sleep(0.2)


def wait_for_run_dir(run_dir: str, timeout: float = 300.0) -> None:
    """Until no process (a killed predecessor still checkpointing) holds the
    run directory's lock, so a retry resumes instead of being refused."""
    from ftjax.train.workdir import LOCK_NAME

    path = os.path.join(run_dir, LOCK_NAME)
    if not os.path.exists(path):
        return
    deadline = time.time() + timeout
    fd = os.open(path, os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.time() > deadline:
                    return  # the run itself will say who holds it
                time.sleep(0.2)
    finally:
        os.close(fd)


class RetryableStop(Exception):
    """The run stopped at a checkpoint (SIGTERM on its node): Ray retries it."""


class StoppedByDriver(Exception):
    """The sweep's driver asked its runs to stop (`stop_file`): not retried."""


def execute_run(cmd: list[str], run_dir: str, cpus: int, env_extra: dict,
                stop_file: str = "") -> int:  # fmt: skip
    """The body of a run's Ray task: the run's process, pinned to `cpus` of
    this node's cores, its output appended to `<run>/run.log`. Once
    `stop_file` exists (the driver writes it on SIGTERM or Ctrl-C, in the
    sweep directory every node sees) the run gets SIGTERM and checkpoints."""
    stopped = lambda: bool(stop_file) and os.path.exists(stop_file)
    if stopped():
        raise StoppedByDriver(f"{run_dir}: the sweep is stopping")
    os.makedirs(run_dir, exist_ok=True)
    wait_for_run_dir(run_dir)
    cores, fds = claim_cores(int(cpus))
    env = {**os.environ, PARENT_ENV: str(os.getpid()), **env_extra}
    if cores:
        env[CPUS_ENV] = ",".join(map(str, cores))
    try:
        with open(os.path.join(run_dir, "run.log"), "a") as log:
            child = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
            try:
                while (code := child.poll()) is None:
                    if stopped():
                        child.send_signal(signal.SIGTERM)
                        child.wait()
                        raise StoppedByDriver(f"{run_dir}: stopped at a checkpoint")
                    time.sleep(0.2)
            except KeyboardInterrupt:  # ray.cancel(force=False), where it reaches us
                child.send_signal(signal.SIGTERM)
                child.wait()
                raise
    finally:
        for fd in fds:
            os.close(fd)
    if code == PREEMPTED_EXIT:
        raise RetryableStop(f"{run_dir}: stopped at a checkpoint")
    return code


def node_address() -> str:
    """`ip:port` of a free port on this node (a gang's coordinator)."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


# ----------------------------------------------------------------------------- the driver


class RayBackend:
    """`run_one` for `ftjax.study.runner.run_sweep`, on a Ray cluster."""

    def __init__(self, config_path: str, sweep_dir: str, *, address: str = "",
                 max_retries: int = 3, quiet: bool = False):  # fmt: skip
        if max_retries < 0:
            raise ConfigError(f"--max_retries={max_retries}; expected an int >= 0")
        ray = _ray()
        self.config_path, self.sweep_dir = config_path, os.path.abspath(sweep_dir)
        self.max_retries, self.quiet = max_retries, quiet
        address = address or os.environ.get("RAY_ADDRESS", "")
        if not ray.is_initialized():
            # "" starts a local cluster on this machine's CPUs; otherwise join one.
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)  # fmt: skip
        self.ray = ray
        self.in_flight: dict = {}
        self.stopping = False
        # Written by `stop()`; one name per driver, so a rerun is not stopped by it.
        self.stop_file = os.path.join(self.sweep_dir, f".stop-{os.getpid()}-{time.time_ns()}")
        self._task = ray.remote(execute_run)
        self._address = ray.remote(node_address)

    def capacity(self, resources: dict) -> int:
        """Runs of `resources` the cluster holds at once (at least 1)."""
        total = self.ray.cluster_resources()
        fits = [total.get("CPU", 0) // (resources["cpus"] * resources["hosts"])]
        if resources["gpus"]:
            fits.append(total.get("GPU", 0) // (resources["gpus"] * resources["hosts"]))
        if resources["tpu_chips"]:
            fits.append(total.get("TPU", 0) // (resources["tpu_chips"] * resources["hosts"]))
        return max(1, int(min(fits)))

    def node_cpus(self) -> int:
        """The CPUs of the largest node (what a prerequisite, alone, takes)."""
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        return max(int(n["Resources"].get("CPU", 1)) for n in nodes) if nodes else 1

    def _options(self, res: dict, cpus: int) -> dict:
        opts = dict(num_cpus=cpus, max_retries=self.max_retries,
                    retry_exceptions=[RetryableStop])  # fmt: skip
        if res["gpus"]:
            opts["num_gpus"] = res["gpus"]
        if res["tpu_chips"]:
            opts["resources"] = {"TPU": res["tpu_chips"]}
        return opts

    def run_one(self, spec, run_dir: str, cores=None) -> dict:
        """Runs one run on the cluster and returns its summary. `cores` is the
        local runner's slot: None means the run goes alone (a prerequisite)."""
        from ftjax.rundir import RunDir

        if self.stopping:  # the driver was told to stop: start nothing new
            raise Preempted(f"run {spec.name}: not started (the sweep is stopping)")
        res = run_resources(spec.config, f"run {spec.name}: resources")
        alone = cores is None
        cpus = max(int(res["cpus"]), self.node_cpus()) if alone else int(res["cpus"])
        cmd = [sys.executable, "-m", "ftjax.study.runner", f"--config={self.config_path}",
               f"--workdir={self.sweep_dir}", f"--only={spec.name}"] + (
                   ["--quiet"] if self.quiet else [])  # fmt: skip
        run_dir = os.path.abspath(run_dir)
        group = None
        try:
            if res["tpu_topology"]:
                group, refs = self._tpu_slice(res, cmd, run_dir, cpus)
            elif res["hosts"] == 1:
                task = self._task.options(**self._options(res, cpus))
                refs = [task.remote(cmd, run_dir, cpus, {}, self.stop_file)]
            else:
                group, refs = self._gang(res, cmd, run_dir, cpus)
            self.in_flight[spec.name] = refs
            codes = self._wait(spec.name, refs, run_dir)
        finally:
            self.in_flight.pop(spec.name, None)
            if group is not None:
                self.ray.util.remove_placement_group(group)
        log = os.path.join(run_dir, "run.log")
        failed = [c for c in codes if c]
        if failed:
            raise RunFailed(spec.name, failed[0], log)
        run = RunDir(run_dir)
        if alone:
            return run.read_summary()
        return run.update_summary(concurrent_runs=self.capacity(res), cpu_cores=cpus)

    def _gang(self, res: dict, cmd, run_dir: str, cpus: int):
        """One task per host, all placed at once: a placement group of `hosts`
        bundles on distinct nodes, host 0's node the coordinator."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": cpus}
        if res["gpus"]:
            bundle["GPU"] = res["gpus"]
        if res["tpu_chips"]:
            bundle["TPU"] = res["tpu_chips"]
        group = placement_group([dict(bundle) for _ in range(int(res["hosts"]))],
                                strategy="STRICT_SPREAD")  # fmt: skip
        self.ray.get(group.ready())
        on = lambda i: PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
        coordinator = self.ray.get(
            self._address.options(num_cpus=0, scheduling_strategy=on(0)).remote()
        )
        refs = []
        for i in range(int(res["hosts"])):
            env = dict(zip(GANG_ENV, (coordinator, str(res["hosts"]), str(i))))
            opts = {k: v for k, v in self._options(res, cpus).items() if k != "resources"}
            opts.pop("num_gpus", None)
            refs.append(self._task.options(**opts, scheduling_strategy=on(i)).remote(
                cmd, run_dir, cpus, env, self.stop_file))  # fmt: skip
        return group, refs

    def _tpu_slice(self, res: dict, cmd, run_dir: str, cpus: int):
        """One task per host of a whole TPU slice reserved for the run (not
        testable without TPUs: written against Ray 2.60's `ray.util.tpu`)."""
        from ray.util import tpu
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        reserved = tpu.slice_placement_group(res["tpu_topology"], res["tpu_version"])
        group = reserved.placement_group
        self.ray.get(group.ready())
        refs = []
        for i in range(reserved.num_bundles):
            on = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
            refs.append(self._task.options(num_cpus=0, max_retries=self.max_retries,
                                           retry_exceptions=[RetryableStop],
                                           scheduling_strategy=on).remote(
                                               cmd, run_dir, cpus, {}, self.stop_file))  # fmt: skip
        return group, refs

    def _wait(self, name: str, refs, run_dir: str) -> list[int]:
        ray = self.ray
        try:
            return ray.get(refs)
        except ray.exceptions.TaskCancelledError:
            raise Preempted(
                f"run {name}: stopped at a checkpoint; rerun the sweep to resume"
            ) from None
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if hasattr(e, "cause") else None
            if isinstance(cause, RetryableStop):
                raise Preempted(f"run {name}: stopped at a checkpoint {self.max_retries + 1} "
                                "times; rerun the sweep to resume") from None  # fmt: skip
            if isinstance(cause, (KeyboardInterrupt, StoppedByDriver)):
                raise Preempted(
                    f"run {name}: stopped at a checkpoint; rerun the sweep to resume"
                ) from None
            raise RunFailed(name, 1, os.path.join(run_dir, "run.log")) from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.RayError) as e:  # fmt: skip
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RunFailed(name, 1, os.path.join(run_dir, "run.log")) from RuntimeError(first)

    def stop(self) -> None:
        """Stops every run: the stop file makes each task pass SIGTERM to its
        run (which checkpoints and exits) or, not yet started, end at once;
        no new run is submitted. The waits on them then end the sweep."""
        self.stopping = True
        os.makedirs(self.sweep_dir, exist_ok=True)
        open(self.stop_file, "w").close()

    def close(self) -> None:
        """Removes this driver's stop file (the sweep directory stays clean)."""
        if os.path.exists(self.stop_file):
            os.remove(self.stop_file)


def slots(backend: RayBackend, specs) -> list:
    """The runs at a time the cluster holds (the local runner's core groups):
    the smallest capacity over the runs' resources."""
    caps = [backend.capacity(run_resources(s.config, f"run {s.name}: resources")) for s in specs]
    return list(range(min(caps) if caps else 1))
