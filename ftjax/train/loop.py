"""The trainer: from a run config to a trained run directory.

    <workdir>/.lock            held by the training process (see workdir.py)
    <workdir>/config.json      the full config of the run
    <workdir>/metrics.jsonl    one line per logged step (appended across resumes;
                               a resume first drops the lines after its checkpoint)
    <workdir>/tensorboard/     the same, as TensorBoard events
    <workdir>/checkpoints/     orbax checkpoints (trainable + optimizer state)
    <workdir>/summary.json     written once the run completes
    <workdir>/adapter/         HF PEFT adapter files (LoRA / DoRA runs)
    <workdir>/hf/              merged weights in HF layout (train.export_hf)

A workdir that already holds a checkpoint resumes from its newest intact one;
nothing is written to the workdir before the checkpoint is known to be this
run's. SIGTERM (Cloud TPU preemption) and SIGINT (Ctrl-C) save a checkpoint at
the end of the current step and return; a second Ctrl-C aborts at once.
A run whose updates the NaN/Inf guard skips `train.max_consecutive_skips`
times in a row stops with `TrainingDiverged`, saving nothing more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import statistics
import time
from typing import Any

import jax
import numpy as np

from ftjax import peft
from ftjax.errors import FtjaxError
from ftjax.eval import classification
from ftjax.eval.metrics import flatten_sets, summarize
from ftjax.rundir import RunDir
from ftjax.train import metrics as metrics_lib
from ftjax.train import workdir as workdir_lib
from ftjax.train.checkpoint import Checkpointer
from ftjax.train.config import check_devices, validate_run_config
from ftjax.train.parallel import Parallel, local_rows, to_host
from ftjax.train.state import build_run, state_info, step_config
from ftjax.train.step import TrainState


@dataclasses.dataclass
class RunResult:
    summary: dict
    model: Any
    params: Any  # combined (trainable + frozen) params, on the host
    base_params: Any
    pipeline: Any


# ----------------------------------------------------------------------------- setup


# Set by ftjax.study.ray_backend for each process of a multi-host run.
GANG_ENV = ("FTJAX_COORDINATOR_ADDRESS", "FTJAX_NUM_PROCESSES", "FTJAX_PROCESS_ID")


def maybe_initialize_distributed(pcfg) -> None:
    """Joins a multi-process job; with no arguments JAX reads the cluster
    environment (Cloud TPU pods, SLURM)."""
    if jax.distributed.is_initialized():
        return
    # A gang the Ray sweep backend started (one process per host) says where to meet.
    gang = [os.environ.get(k, "") for k in GANG_ENV]
    if all(gang):
        # CPU processes need gloo for their collectives (GPU and TPU ignore this).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=gang[0], num_processes=int(gang[1]), process_id=int(gang[2])
        )
        return
    if not pcfg.distributed:
        return
    kwargs = {}
    if pcfg.coordinator_address:
        kwargs = dict(
            coordinator_address=pcfg.coordinator_address,
            num_processes=pcfg.num_processes,
            process_id=pcfg.process_id,
        )
    jax.distributed.initialize(**kwargs)


class TrainingDiverged(FtjaxError):
    """Too many updates in a row were skipped by the NaN/Inf guard."""


class _StopSignals:
    """SIGTERM and SIGINT ask the loop to save a checkpoint at the end of the
    current step and return; a second SIGINT aborts at once (KeyboardInterrupt).
    Outside the main thread no handler can be installed: signals act as usual."""

    def __init__(self):
        self.received = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class _SkipWatch:
    """Follows the NaN/Inf guard's cumulative skip counter one step behind the
    device (so the host never waits for the step it has just dispatched): logs
    skipped updates (the 1st, 2nd, 4th, 8th... of a streak) and says when a
    streak reaches `limit` (0: never)."""

    def __init__(self, limit: int, skipped: int):
        self.limit, self.last, self.streak = limit, skipped, 0
        self.first = self.step = None
        self._pending = None

    def push(self, step: int, skipped) -> bool:
        previous, self._pending = self._pending, (step, skipped)
        return self._check(previous)

    def flush(self) -> bool:
        previous, self._pending = self._pending, None
        return self._check(previous)

    def _check(self, item) -> bool:
        if item is None:
            return False
        step, skipped = item
        count = int(to_host(skipped))
        if count == self.last:
            self.streak = 0
            return False
        self.last, self.streak = count, self.streak + 1
        if self.streak == 1:
            self.first = step
        if self.streak & (self.streak - 1) == 0:
            metrics_lib.log(
                f"warning: step {step}: update skipped (non-finite loss or gradients; "
                f"{self.streak} in a row, {count} in all)"
            )
        self.step = step
        return bool(self.limit) and self.streak >= self.limit

    def error(self, latest_checkpoint) -> TrainingDiverged:
        kept = "no checkpoint" if latest_checkpoint is None else f"checkpoint {latest_checkpoint}"
        return TrainingDiverged(
            f"train.max_consecutive_skips={self.limit}: the updates of steps {self.first}-"
            f"{self.step} were all skipped (non-finite loss or gradients: the run diverged); "
            f"stopped, the last saved is {kept}; lower optim.lr"
        )


# ----------------------------------------------------------------------------- eval


def evaluate(par: Parallel, state, pipeline, max_batches: int = 0) -> dict:
    """Token-level loss/perplexity/accuracy per named eval set (exact sums)."""
    sets, scores = {}, {}
    for name in pipeline.eval_names:
        totals = {"loss_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0}
        rows, predictions = [], []
        for i, batch in enumerate(pipeline.eval_batches(name)):
            if max_batches and i >= max_batches:
                break
            sums = par.eval_sums(state, par.place_batch(batch))
            totals["loss_sum"] += float(to_host(sums["loss_sum"]))
            totals["correct_sum"] += float(to_host(sums["correct_sum"]))
            totals["weight_sum"] += float(to_host(sums["count"]))
            if "predictions" in sums:
                rows.append(batch["example_index"])
                predictions.append(local_rows(sums["predictions"]))
        sets[name] = summarize(totals, f"eval set {name!r}")  # the one reduction and perplexity
        if predictions:
            scores[name] = classification.score_eval_set(
                pipeline.eval_labels(name), rows, predictions, pipeline.label_kind
            )
    out = flatten_sets(sets, "eval", metrics=("loss", "perplexity", "accuracy"))
    for name, values in scores.items():
        out.update({f"eval/{name}/{k}": v for k, v in values.items()})
    if sets:
        out["eval/loss"] = float(np.mean([m["loss"] for m in sets.values()]))
    return out


# ----------------------------------------------------------------------------- train


@dataclasses.dataclass
class _Setup:
    """Everything a run is built from, before any state is restored."""

    model: Any
    base_params: Any
    pipeline: Any
    method: Any
    n_trainable: int
    n_total: int
    schedule: Any
    par: Parallel
    state: TrainState  # freshly initialized, placed on the devices
    ckpt: Checkpointer
    flops_per_token: float
    train_state_bytes: int
    curve: Any = None  # (step, params) -> extra metrics at each evaluation


def train(cfg, workdir: str, quiet: bool = False, curve=None) -> RunResult:
    """Trains (or resumes) the run described by `cfg` in `workdir`, holding the
    workdir's lock throughout (a second trainer there is refused).

    `curve(model, pipeline)`, if given, returns a function `(step, params) ->
    dict` of extra metrics (e.g. a study's exact match along training), called
    with the combined parameters wherever the loop evaluates (every
    `train.eval_every` steps, at the end, and at step 0 of a fresh run); its
    values go into metrics.jsonl with the evaluation's."""
    validate_run_config(cfg)
    maybe_initialize_distributed(cfg.parallel)
    check_devices(cfg, jax.device_count())
    workdir_lib.prepare(workdir)
    main = jax.process_index() == 0
    with workdir_lib.locked(workdir) if main else contextlib.nullcontext():
        t_start = time.time()
        setup = _build(cfg, workdir)
        if curve is not None:
            setup.curve = curve(setup.model, setup.pipeline)
        try:
            return _run(cfg, workdir, quiet, setup, t_start)
        finally:
            setup.ckpt.close()


def _build(cfg, workdir: str) -> _Setup:
    from ftjax.data import build_pipeline

    # The data first: its errors are the commonest, and cheaper to reach than
    # a loaded (and, for PiSSA or QLoRA, transformed) model.
    pipeline = build_pipeline(
        cfg.data, process_index=jax.process_index(), process_count=jax.process_count()
    )
    metrics_lib.log(pipeline.stats_line())
    start = build_run(cfg)
    _check_task(pipeline, start.model.cfg)
    info = state_info(start.state, start.method)
    metrics_lib.log(
        f"method {cfg.method.name}: {info.n_trainable:,} trainable of {info.n_total:,} "
        f"parameters ({100.0 * info.trainable_share:.3f}%)"
    )
    step_cfg = step_config(cfg)
    model = start.model
    par = Parallel(
        cfg.parallel.mode,
        model,
        start.tx,
        step_cfg,
        int(cfg.parallel.model_parallel),
        offload_optimizer=bool(cfg.parallel.offload_optimizer),
    )
    par.check_batch_size(int(cfg.data.batch_size), step_cfg.accum_steps)
    ckpt = start.checkpointer(
        workdir,
        keep=cfg.train.keep,
        best_metric=cfg.train.best_metric or None,
        best_mode=cfg.train.best_mode,
        async_save=cfg.train.async_checkpoint,
    )
    return _Setup(
        model, start.base_params, pipeline, start.method, info.n_trainable, info.n_total,
        start.schedule, par, par.place_state(start.state), ckpt,
        info.flops_per_token(model.cfg, int(cfg.data.seq_len)), info.train_state_bytes,
    )  # fmt: skip


def _check_task(pipeline, model_cfg) -> None:
    """Classification data needs a classification head, and the head the labels."""
    labeled = getattr(pipeline, "kind", "") == "classification"
    if labeled:
        task = (
            "token_classification" if pipeline.label_kind == "token" else "sequence_classification"
        )
        if model_cfg.task != task:
            raise FtjaxError(
                f"data: {pipeline.label_kind} labels need model.task={task!r}; the model's task "
                f"is {model_cfg.task!r}"
            )
    if not labeled and model_cfg.task:
        raise FtjaxError(
            f"model.task={model_cfg.task!r} needs classification data (sources of format "
            "'classification')"
        )
    if labeled:
        pipeline.check_model(model_cfg.num_labels, model_cfg.type_vocab_size)


def _restore(setup: _Setup):
    """(state, step restored from or None): the newest intact checkpoint of
    this run, or the fresh state. Raises CheckpointMismatch for another run's."""
    par = setup.par
    restored, step = setup.ckpt.restore_latest(par.host_state(setup.state))
    if restored is None:
        return setup.state, None
    metrics_lib.log(f"resumed from checkpoint at step {step}")
    return par.place_state(restored), step


def _open_outputs(cfg, workdir: str, start: int, quiet: bool) -> metrics_lib.MetricsWriter:
    """The run's files, written only once the run is known to belong here."""
    if jax.process_index() == 0:
        run = RunDir(workdir)
        run.write_config(cfg)
        # A fresh start (no checkpoint) drops everything, its step-0 line included.
        dropped = run.truncate_metrics_after(start if start else -1)
        if dropped:
            metrics_lib.log(f"metrics.jsonl: dropped {dropped} line(s) logged after step {start}")
    return metrics_lib.MetricsWriter(workdir, cfg.train.steps, cfg.train.tensorboard, quiet)


def _run(cfg, workdir: str, quiet: bool, setup: _Setup, t_start: float) -> RunResult:
    state, resumed_from = _restore(setup)
    host = setup.par.host_state(state)
    start, skipped = int(to_host(host.step)), int(to_host(host.skipped))
    writer = _open_outputs(cfg, workdir, start, quiet)
    stop = _StopSignals()
    try:
        state, step, stopped, timing = _loop(cfg, setup, state, start, skipped, writer, stop)
        if stopped:
            metrics_lib.log(f"{stop.name}: saving a checkpoint at step {step} and exiting")
            setup.ckpt.save(setup.par.host_state(state), {}, force=True)
            setup.ckpt.close()
            status = "preempted" if stop.received == signal.SIGTERM else "interrupted"
            summary = {"status": status, "signal": stop.name, "step": step}
            return RunResult(summary, setup.model, None, None, setup.pipeline)
        final_eval = evaluate(setup.par, state, setup.pipeline, cfg.train.eval_max_batches)
        final_eval.update(_curve_point(setup, state, step))
        writer.write(step, final_eval)
        setup.ckpt.save(setup.par.host_state(state), final_eval)
        setup.ckpt.close()
    finally:
        writer.close()
        stop.restore()
    return _finish(cfg, workdir, setup, state, resumed_from, final_eval, timing, t_start)


def _loop(cfg, setup: _Setup, state, start: int, skipped: int, writer, stop: _StopSignals):
    """Steps from `start` to train.steps: (state, step, stopped by a signal, timing)."""
    par, pipeline, ckpt, tc = setup.par, setup.pipeline, setup.ckpt, cfg.train
    timing = metrics_lib.Throughput(setup.flops_per_token, tc.peak_flops)
    watch = _SkipWatch(int(tc.get("max_consecutive_skips", 0)), skipped)
    last_eval, step = {}, start
    if start == 0 and setup.curve is not None and tc.eval_every:
        # Where every curve starts: the model before fine-tuning.
        writer.write(0, {**evaluate(par, state, pipeline, tc.eval_max_batches),
                         **_curve_point(setup, state, 0)})  # fmt: skip
    while step < tc.steps:
        batch = pipeline.batch_at(step)
        tokens = int(np.sum(batch["attention_mask"])) * jax.process_count()
        t0 = time.time()
        state, m = par.train_step(state, par.place_batch(batch))
        step += 1
        timing.step_done(t0, m, tokens)
        if watch.push(step, m["skipped"]) or (step == tc.steps and watch.flush()):
            raise watch.error(ckpt.latest_step())
        record = None
        if step % tc.log_every == 0 or step == tc.steps:
            record = _log_record(m, setup, step, timing)
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
            last_eval = evaluate(par, state, pipeline, tc.eval_max_batches)
            record = {**(record or {}), **last_eval, **_curve_point(setup, state, step)}
        if record is not None:
            writer.write(step, record)
        if tc.checkpoint_every and step % tc.checkpoint_every == 0:
            if watch.flush():
                raise watch.error(ckpt.latest_step())
            if watch.streak:  # keep the checkpoints from before the skips
                metrics_lib.log(f"step {step}: no checkpoint while updates are being skipped")
            else:
                ckpt.save(par.host_state(state), last_eval)
        if stop.received is not None:
            return state, step, True, timing
    return state, step, False, timing


def _curve_point(setup: _Setup, state, step: int) -> dict:
    if setup.curve is None:
        return {}
    host = setup.par.host_state(state)
    return setup.curve(step, peft.combine(host.trainable, host.frozen))


def _log_record(m, setup: _Setup, step: int, timing: metrics_lib.Throughput) -> dict:
    host = {k: float(to_host(v)) for k, v in m.items()}
    return {
        **host,
        "lr": float(setup.schedule(step - 1)),
        **timing.record(),
        "trainable_params": setup.n_trainable,
        "total_params": setup.n_total,
        **metrics_lib.peak_memory_bytes(),
    }


def _finish(cfg, workdir, setup: _Setup, state, resumed_from, final_eval, timing, t_start):
    host_state = jax.device_get(setup.par.host_state(state))
    final_params = peft.combine(host_state.trainable, host_state.frozen)
    n_trainable, n_total = setup.n_trainable, setup.n_total
    summary = {
        "status": "completed",
        "steps": int(cfg.train.steps),
        "resumed_from": resumed_from,
        "method": cfg.method.to_dict(),
        "trainable_params": int(n_trainable),
        "total_params": int(n_total),
        "trainable_share": n_trainable / max(n_total, 1),
        "skipped_updates": int(host_state.skipped),
        "compile_time_s": timing.compile_time,
        "step_time_s": statistics.median(timing.step_times) if timing.step_times else None,
        "tokens_per_s": _median_metric(workdir, "tokens_per_s"),
        "flops_per_token": setup.flops_per_token,
        # Weights + gradients + optimizer state: the memory a method decides
        # (activations aside), exact and comparable across runs of one process.
        "train_state_bytes": setup.train_state_bytes,
        "wall_time_s": time.time() - t_start,
        "lr": float(cfg.optim.lr),
        "data": setup.pipeline.stats,
        **metrics_lib.peak_memory_bytes(),
        **final_eval,
    }
    if jax.process_index() == 0:
        summary.update(_export(cfg, workdir, setup.model, setup.method, final_params, setup))
        RunDir(workdir).update_summary(summary)  # merged: keeps a role the sweep set first
    return RunResult(summary, setup.model, final_params, setup.base_params, setup.pipeline)


def _median_metric(workdir, key):
    values = [r[key] for r in RunDir(workdir).read_metrics() if r.get(key) is not None]
    return statistics.median(values) if values else None


def _export(cfg, workdir, model, method, params, setup) -> dict:
    """The adapter in HF PEFT format (through the method's registry entry) and
    merged HF weights, as configured. A method that cannot be exported as an
    adapter is recorded in the summary, not fatal: the run itself finished."""
    from ftjax.peft import registry

    out = {}
    spec = registry.get(method.name)
    if cfg.train.export_adapter and spec.export is not None and peft.has_adapters(params):
        try:
            spec.export(model.cfg, params, os.path.join(workdir, "adapter"), method.config,
                        initial=setup.base_params)  # fmt: skip
        except peft.AdapterFormatError as e:
            metrics_lib.log(f"warning: no HF PEFT adapter written: {e}")
            out["adapter_export_error"] = str(e)
    if cfg.train.export_hf:
        from ftjax.models import save_pretrained

        save_pretrained(model, peft.merge(params), os.path.join(workdir, "hf"))
    return out
