"""The trainer: from a run config to a trained run directory.

    <workdir>/config.json      the full config of the run
    <workdir>/metrics.jsonl    one line per logged step (appended across resumes)
    <workdir>/tensorboard/     the same, as TensorBoard events
    <workdir>/checkpoints/     orbax checkpoints (trainable + optimizer state)
    <workdir>/summary.json     written once the run completes
    <workdir>/adapter/         HF PEFT adapter files (LoRA / DoRA runs)
    <workdir>/hf/              merged weights in HF layout (train.export_hf)

A workdir that already holds a checkpoint resumes from it; SIGTERM (Cloud TPU
preemption) saves a final checkpoint and returns cleanly.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import peft
from ftjax.models import ModelConfig, build_model, config_to_hf, from_pretrained
from ftjax.models.hf import resolve_dir
from ftjax.train import metrics as metrics_lib
from ftjax.train.checkpoint import Checkpointer, checksum_files
from ftjax.train.config import validate_run_config
from ftjax.train.optim import build_optimizer
from ftjax.train.parallel import Parallel, to_host
from ftjax.train.step import StepConfig, TrainState


@dataclasses.dataclass
class RunResult:
    summary: dict
    model: Any
    params: Any  # combined (trainable + frozen) params, on the host
    base_params: Any
    pipeline: Any


# ----------------------------------------------------------------------------- setup


def maybe_initialize_distributed(pcfg) -> None:
    """Joins a multi-process job; with no arguments JAX reads the cluster
    environment (Cloud TPU pods, SLURM)."""
    if not pcfg.distributed or jax.distributed.is_initialized():
        return
    kwargs = {}
    if pcfg.coordinator_address:
        kwargs = dict(
            coordinator_address=pcfg.coordinator_address,
            num_processes=pcfg.num_processes,
            process_id=pcfg.process_id,
        )
    jax.distributed.initialize(**kwargs)


def load_base(mcfg, seed: int):
    """(model, params, identity) of the model fine-tuning starts from."""
    options = dict(dtype=mcfg.dtype, scan_layers=mcfg.scan_layers, remat=mcfg.remat)
    if mcfg.checkpoint:
        model, params = from_pretrained(mcfg.checkpoint, param_dtype=mcfg.param_dtype, **options)
        files = glob.glob(os.path.join(resolve_dir(mcfg.checkpoint), "*.safetensors"))
        base = {"source": mcfg.checkpoint, "checksum": checksum_files(files)}
    else:
        cfg = ModelConfig(**{**mcfg.init.to_dict(), "param_dtype": mcfg.param_dtype, **options})
        model = build_model(cfg)
        params = model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]
        base = {"source": "random-init", "seed": seed}
    return model, params, base


def model_identity(model) -> dict:
    return config_to_hf(model.cfg)


def _install_sigterm():
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no preemption handling
        previous = None
    return flag, previous


# ----------------------------------------------------------------------------- eval


def evaluate(par: Parallel, state, pipeline, max_batches: int = 0) -> dict:
    """Token-level loss/perplexity/accuracy per named eval set (exact sums)."""
    out = {}
    for name in pipeline.eval_names:
        totals = {"loss_sum": 0.0, "correct_sum": 0.0, "count": 0.0}
        for i, batch in enumerate(pipeline.eval_batches(name)):
            if max_batches and i >= max_batches:
                break
            sums = par.eval_sums(state, par.place_batch(batch))
            for k in totals:
                totals[k] += float(to_host(sums[k]))
        count = max(totals["count"], 1.0)
        loss = totals["loss_sum"] / count
        out[f"eval/{name}/loss"] = loss
        out[f"eval/{name}/perplexity"] = float(np.exp(min(loss, 50.0)))
        out[f"eval/{name}/token_accuracy"] = totals["correct_sum"] / count
    if out:
        losses = [v for k, v in out.items() if k.endswith("/loss")]
        out["eval/loss"] = float(np.mean(losses))
    return out


# ----------------------------------------------------------------------------- train


def train(cfg, workdir: str, quiet: bool = False) -> RunResult:
    """Trains (or resumes) the run described by `cfg` in `workdir`."""
    from ftjax.data import build_pipeline

    validate_run_config(cfg)
    maybe_initialize_distributed(cfg.parallel)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
    t_start = time.time()
    seed = int(cfg.train.seed)
    model, base_params, base_identity = load_base(cfg.model, seed)
    # A host copy: the device state is donated to each step, and the base is
    # needed afterwards (forgetting baselines, weight analysis).
    base_params = jax.device_get(base_params)
    pipeline = build_pipeline(
        cfg.data, process_index=jax.process_index(), process_count=jax.process_count()
    )
    metrics_lib.log(pipeline.stats_line())

    method = peft.build_method(cfg.method)
    rng_method, rng_train = jax.random.split(jax.random.key(seed + 1))
    params = method.apply(base_params, rng_method)
    trainable, frozen = method.split(params)
    n_trainable, n_total = method.count(params)
    metrics_lib.log(
        f"method {cfg.method.name}: {n_trainable:,} trainable of {n_total:,} parameters "
        f"({100.0 * n_trainable / max(n_total, 1):.3f}%)"
    )

    tx, schedule = build_optimizer(cfg.optim, cfg.train.steps)
    step_cfg = StepConfig(
        accum_steps=int(cfg.optim.accum_steps),
        z_loss=float(cfg.train.z_loss),
        label_smoothing=float(cfg.train.label_smoothing),
    )
    par = Parallel(cfg.parallel.mode, model, tx, step_cfg, int(cfg.parallel.model_parallel))
    par.check_batch_size(int(cfg.data.batch_size), step_cfg.accum_steps)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=tx.init(trainable),
        rng=jax.random.key_data(rng_train),
        skipped=jnp.zeros((), jnp.int32),
    )
    identity = {
        "model": model_identity(model),
        "method": cfg.method.to_dict(),
        "base": base_identity,
    }
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        identity,
        keep=cfg.train.keep,
        best_metric=cfg.train.best_metric or None,
        best_mode=cfg.train.best_mode,
        async_save=cfg.train.async_checkpoint,
    )
    state = par.place_state(state)
    resumed_from = ckpt.latest_step()
    if resumed_from is not None:
        state = par.place_state(ckpt.restore(par.host_state(state)))
        metrics_lib.log(f"resumed from checkpoint at step {resumed_from}")
    start = int(to_host(par.host_state(state).step))

    # FLOPs per token for MFU: matmul weights of the model (not embeddings).
    n_matmul, n_trainable_matmul = metrics_lib.matmul_param_counts(params, trainable)
    flops_per_token = metrics_lib.train_flops_per_token(
        n_matmul, n_trainable_matmul, model.cfg, int(cfg.data.seq_len)
    )
    train_state_bytes = int(
        peft.nbytes(trainable) * 2
        + peft.nbytes(frozen)
        + peft.nbytes(jax.eval_shape(tx.init, trainable))
    )
    writer = metrics_lib.MetricsWriter(workdir, cfg.train.steps, cfg.train.tensorboard, quiet)
    stop, previous_handler = _install_sigterm()
    step_times, compile_time, last_eval = [], None, {}
    kill_at = os.environ.get("FTJAX_TEST_KILL_AT_STEP")
    step = start
    t_interval, tokens_interval, steps_interval = time.time(), 0, 0
    try:
        while step < cfg.train.steps:
            batch = pipeline.batch_at(step)
            tokens = int(np.sum(batch["attention_mask"])) * jax.process_count()
            t0 = time.time()
            state, m = par.train_step(state, par.place_batch(batch))
            step += 1
            if compile_time is None:
                jax.block_until_ready(m)
                compile_time = time.time() - t0
                t_interval, tokens_interval, steps_interval = time.time(), 0, 0
            else:
                tokens_interval += tokens
                steps_interval += 1
            record = None
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                host = {k: float(to_host(v)) for k, v in m.items()}
                elapsed = time.time() - t_interval
                record = {**host, "lr": float(schedule(step - 1))}
                if steps_interval:
                    step_time = elapsed / steps_interval
                    step_times.append(step_time)
                    tps = tokens_interval / elapsed
                    record.update(step_time=step_time, tokens_per_s=tps)
                    if cfg.train.peak_flops:
                        peak = cfg.train.peak_flops * jax.device_count()
                        record["mfu"] = flops_per_token * tps / peak
                record.update(
                    trainable_params=n_trainable,
                    total_params=n_total,
                    **metrics_lib.peak_memory_bytes(),
                )
                t_interval, tokens_interval, steps_interval = time.time(), 0, 0
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                last_eval = evaluate(par, state, pipeline, cfg.train.eval_max_batches)
                record = {**(record or {}), **last_eval}
            if record is not None:
                writer.write(step, record)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                ckpt.save(par.host_state(state), last_eval)
            if kill_at and step == int(kill_at):  # test hook: die like a preempted VM
                os.kill(os.getpid(), signal.SIGKILL)
            if stop["stop"]:
                metrics_lib.log(f"SIGTERM: saving a checkpoint at step {step} and exiting")
                ckpt.save(par.host_state(state), last_eval, force=True)
                ckpt.close()
                writer.close()
                return RunResult({"status": "preempted", "step": step}, model, None, None, pipeline)
        final_eval = evaluate(par, state, pipeline, cfg.train.eval_max_batches)
        writer.write(step, final_eval)
        ckpt.save(par.host_state(state), final_eval)
        ckpt.close()
    finally:
        writer.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    host_state = jax.device_get(par.host_state(state))
    final_params = peft.combine(host_state.trainable, host_state.frozen)
    summary = {
        "status": "completed",
        "steps": int(cfg.train.steps),
        "resumed_from": resumed_from,
        "method": cfg.method.to_dict(),
        "trainable_params": int(n_trainable),
        "total_params": int(n_total),
        "trainable_share": n_trainable / max(n_total, 1),
        "skipped_updates": int(host_state.skipped),
        "compile_time_s": compile_time,
        "step_time_s": statistics.median(step_times) if step_times else None,
        "tokens_per_s": _median_metric(workdir, "tokens_per_s"),
        "flops_per_token": flops_per_token,
        # Weights + gradients + optimizer state: the memory a method decides
        # (activations aside), exact and comparable across runs of one process.
        "train_state_bytes": train_state_bytes,
        "wall_time_s": time.time() - t_start,
        "lr": float(cfg.optim.lr),
        "data": pipeline.stats,
        **metrics_lib.peak_memory_bytes(),
        **final_eval,
    }
    if jax.process_index() == 0:
        _export(cfg, workdir, model, method, final_params)
        write_summary(workdir, summary)
    return RunResult(summary, model, final_params, base_params, pipeline)


def _median_metric(workdir, key):
    path = os.path.join(workdir, "metrics.jsonl")
    values = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get(key) is not None:
                values.append(rec[key])
    return statistics.median(values) if values else None


def _export(cfg, workdir, model, method, params):
    if cfg.train.export_adapter and peft.has_adapters(params):
        peft.save_adapter(model.cfg, params, os.path.join(workdir, "adapter"), method=method)
    if cfg.train.export_hf:
        from ftjax.models import save_pretrained

        save_pretrained(model, peft.merge(params), os.path.join(workdir, "hf"))


def write_summary(workdir: str, summary: dict) -> None:
    """Atomically: a crash never leaves a half-written summary that the sweep
    runner would take for a finished run."""
    path = os.path.join(workdir, "summary.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True, default=_json_default)
    os.replace(tmp, path)


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
