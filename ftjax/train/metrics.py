"""Where metrics go (stdout with a progress bar, metrics.jsonl, TensorBoard)
and the quantities computed for them (FLOPs per token, peak memory)."""

from __future__ import annotations

import os
import resource
import sys
import time

import jax

from ftjax.rundir import RunDir


def train_flops_per_token(n_matmul: int, n_trainable_matmul: int, cfg, seq_len: int) -> float:
    """Model FLOPs per trained token (the PaLM MFU convention, made method-aware).

    Forward: 2 FLOPs per weight. Backward: 2 per weight for the activation
    gradients, plus 2 per *trainable* weight for the weight gradients — frozen
    weights need none, which is where PEFT saves compute. So full tuning is the
    familiar 6N and LoRA about 4N. Attention scores add 12·layers·seq·d per token
    (causal halving ignored, as in the convention).
    """
    attn = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_size
    return 4.0 * n_matmul + 2.0 * n_trainable_matmul + attn


def peak_memory_bytes() -> dict:
    """Peak device memory where the backend reports it, else process RSS."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # CPU backends may not implement memory_stats
        stats = {}
    if "peak_bytes_in_use" in stats:
        out["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
    return out


class Throughput:
    """Step time, tokens/s and MFU over the steps since the last log line; the
    first (compiling) step is timed apart."""

    def __init__(self, flops_per_token: float, peak_flops: float):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.compile_time, self.step_times = None, []
        self._reset()

    def _reset(self):
        self.t, self.tokens, self.steps = time.time(), 0, 0

    def step_done(self, t0: float, metrics, tokens: int):
        if self.compile_time is None:
            jax.block_until_ready(metrics)
            self.compile_time = time.time() - t0
            self._reset()
        else:
            self.tokens += tokens
            self.steps += 1

    def record(self) -> dict:
        out, elapsed = {}, time.time() - self.t
        if self.steps:
            step_time, tps = elapsed / self.steps, self.tokens / elapsed
            self.step_times.append(step_time)
            out.update(step_time=step_time, tokens_per_s=tps)
            if self.peak_flops:
                out["mfu"] = self.flops_per_token * tps / (self.peak_flops * jax.device_count())
        self._reset()
        return out


class MetricsWriter:
    """Writes each metrics dict to metrics.jsonl (append: resumed runs extend
    the same file), TensorBoard and, on process 0, a progress line."""

    def __init__(self, workdir: str, total_steps: int, tensorboard: bool = True, quiet=False):
        self.total = total_steps
        self.is_main = jax.process_index() == 0
        self.quiet = quiet
        self._run = RunDir(workdir) if self.is_main else None
        self._tb = None
        if tensorboard and self.is_main:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional; jsonl is the source of truth
                self._tb = None
        self._start = time.time()

    def write(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._run.append_metrics([record])
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        # Quiet (sweeps): a progress line at every fifth of the run, not every log step.
        if not self.quiet or step % max(self.total // 5, 1) == 0 or step >= self.total:
            print(self._progress_line(step, record), flush=True)

    def _progress_line(self, step, record) -> str:
        frac = min(step / max(self.total, 1), 1.0)
        bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
        keys = ("loss", "eval/loss", "lr", "grad_norm", "tokens_per_s", "mfu")
        shown = " ".join(
            f"{k}={_fmt(record[k])}" for k in keys if k in record and record[k] is not None
        )
        evals = " ".join(
            f"{k}={_fmt(v)}"
            for k, v in record.items()
            if k.startswith("eval/") and k.endswith("loss")
        )
        return f"[{bar}] {step}/{self.total} {shown} {evals}".rstrip()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stdout, flush=True)


def matmul_param_counts(params, trainable) -> tuple[int, int]:
    """(weights in matmuls, trainable weights in matmuls), embeddings excluded.

    A matmul weight is any `kernel`; an adapter leaf counts as its dense
    materialized size, and its trainable children count as trainable."""
    from ftjax.models.layers import is_weight_leaf, materialize

    def kernel_sizes(tree, dense: bool) -> int:
        total = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_weight_leaf)[0]:
            if "kernel" not in jax.tree_util.keystr(path):
                continue
            if dense and is_weight_leaf(leaf):
                total += int(jax.eval_shape(materialize, leaf).size)
            else:
                total += sum(int(x.size) for x in jax.tree.leaves(leaf))
        return total

    return kernel_sizes(params, dense=True), kernel_sizes(trainable, dense=False)
