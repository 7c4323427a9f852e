"""Performance benchmark: step time, tokens/s, MFU and memory per fine-tuning
method, side by side with PyTorch + transformers + PEFT on the same machine.

Every measured unit (a train step of one method in one framework, a prefill
plus a decode) is a *job* living in its own worker process, so that each
process's peak RSS belongs to one method. The coordinator drives the workers in
round-robin rounds, one step each and a rotated order per round, so that all
jobs see the same machine: on a shared, noisy host the ratios of per-round
times (medians over rounds) are what stay meaningful, not absolute seconds.
Each training step is followed, in the same process, by a large matmul of the
compute dtype: the measured peak that MFU (a) divides by.

    results = run(BenchConfig(preset="quick", methods=("full", "lora")))
    print(markdown(results))

Workers are `python -m ftjax.bench '<spec json>'`, speaking one JSON line per
command on stdin/stdout (setup, step, profile, finish). `isolate=False` runs the
same jobs in this process instead (tests; per-method RSS is then meaningless).

Modules: `config` (model sizes, methods, `BenchConfig`), `runner` (the
coordinator), `workers` (the processes and their protocol), `jobs`, `jax_jobs`
and `torch_jobs` (the measured units), `results` (summary, goals, tables),
`variants` (config changes timed beside the base), `profile` (op breakdown of a traced
step), `memory` (RSS).
"""

# Importing this package must not load a framework: every JAX, torch or ftjax
# import below it is inside a job's methods, which run in the workers.
from .config import (
    METHODS,
    PEAK_TRIES,
    PRESETS,
    QUICK,
    TORCH_METHODS,
    BenchConfig,
    method_config,
    optim_config,
)
from .jax_jobs import JaxInfer, JaxJob, JaxTrain, host_params
from .jobs import best_time, synthetic_batch
from .memory import reset_rss_peak, rss_bytes
from .profile import _hlo_ops, op_breakdown
from .results import goals, machine, markdown, summarize
from .runner import job_specs, memory_specs, run, run_jobs
from .torch_jobs import TorchInfer, TorchJob, TorchTrain
from .variants import VARIANTS
from .workers import JOBS, InProcess, Worker, WorkerError

__all__ = [
    "JOBS",
    "METHODS",
    "PEAK_TRIES",
    "PRESETS",
    "QUICK",
    "TORCH_METHODS",
    "VARIANTS",
    "BenchConfig",
    "InProcess",
    "JaxInfer",
    "JaxJob",
    "JaxTrain",
    "TorchInfer",
    "TorchJob",
    "TorchTrain",
    "Worker",
    "WorkerError",
    "_hlo_ops",  # tests
    "best_time",
    "goals",
    "host_params",
    "job_specs",
    "machine",
    "markdown",
    "memory_specs",
    "method_config",
    "op_breakdown",
    "optim_config",
    "reset_rss_peak",
    "rss_bytes",
    "run",
    "run_jobs",
    "summarize",
    "synthetic_batch",
]
