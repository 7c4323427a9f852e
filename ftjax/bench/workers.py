"""Job processes: a worker's side of the JSON-lines protocol (`worker_main`,
run by `python -m ftjax.bench '<spec json>'`), the coordinator's handle on a
worker, and the in-process stand-in that tests use."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

from ftjax.errors import ConfigError

from .config import BenchConfig
from .jax_jobs import JaxInfer, JaxTrain
from .torch_jobs import TorchInfer, TorchTrain

JOBS = {
    "jax_train": JaxTrain,
    "jax_infer": JaxInfer,
    "torch_train": TorchTrain,
    "torch_infer": TorchInfer,
}


def worker_main(argv) -> None:
    """A worker process: one job, commands as JSON lines on stdin, replies on
    the original stdout (library prints are redirected to stderr)."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    spec = json.loads(argv[1])
    job = None
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        try:
            if job is None:
                job = JOBS[spec["kind"]](spec)
            out = {"ok": True, "result": getattr(job, cmd)()}
        except Exception:  # reported to the coordinator, which records it per job
            out = {"ok": False, "error": traceback.format_exc()}
        reply.write(json.dumps(out) + "\n")
        if cmd == "finish" or not out["ok"]:
            break


class WorkerError(RuntimeError):
    pass


class Worker:
    """The coordinator's handle on one worker process."""

    def __init__(self, spec: dict, env: dict):
        self.name = spec["name"]
        if spec.get("xla_flags"):
            env = {**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} {spec['xla_flags']}".strip()}
        self.log = tempfile.TemporaryFile(mode="w+")
        # The repository root (above ftjax/bench/), so that the worker imports this ftjax.
        root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
        env = {**env, "PYTHONPATH": os.pathsep.join([root, env.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ftjax.bench", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def call(self, cmd: str) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = self.log.read()[-2000:]
            raise WorkerError(f"{self.name}: worker exited ({self.proc.returncode}): {tail}")
        out = json.loads(line)
        if not out["ok"]:
            raise WorkerError(f"{self.name}: {out['error']}")
        return out["result"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class InProcess:
    """A job run in this process (tests): same interface as `Worker`."""

    def __init__(self, spec: dict):
        self.name = spec["name"]
        if spec.get("xla_flags"):
            raise ConfigError(f"{self.name}: XLA flags need a fresh process (isolate=True)")
        if spec["kind"].startswith("torch"):
            import torch

            # Beside JAX's thread pool in one process, torch's spinning OpenMP
            # workers slow a step by 100x; one thread keeps the test path sane.
            torch.set_num_threads(1)
        self.job = JOBS[spec["kind"]](spec)

    def call(self, cmd: str) -> dict:
        try:
            return getattr(self.job, cmd)()
        except Exception as e:
            raise WorkerError(f"{self.name}: {traceback.format_exc()}") from e

    def close(self):
        self.job = None


def worker_env(bc: BenchConfig) -> dict:
    env = dict(os.environ)
    # Tests simulate 8 CPU devices; a benchmark worker wants one device with all cores.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = " ".join(f for f in (flags.strip(), bc.xla_flags) if f)
    if bc.interleave:  # several JAX processes share one accelerator
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # compile times are measured, not cache reads
    return env
