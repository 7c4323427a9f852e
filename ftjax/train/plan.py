"""The planner: compile a run's exact train step ahead of time for a target
(local devices, simulated CPU devices, or a Cloud TPU slice) and report what
it needs per device, before any hardware is paid for.

The step is the one `scripts/train.py` runs: the same config (file and
overrides), model, method, optimizer, step options, parallel mode and
shardings (`Parallel`, `step_config`, `init_state`). Only the model's
`config.json` is read; parameters and the state are abstract shapes
(`jax.eval_shape`), so nothing is downloaded or allocated, and a 70B model
plans on a laptop. The memory figures are the compiler's own buffer
assignment (`memory_analysis`); the step time is a roofline lower bound from
the target's datasheet peak, an estimate and marked as one.

    report = plan(cfg, resolve_target("v5e-8"))
    print(format_report(report))
"""

from __future__ import annotations

import re
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from ftjax import peft
from ftjax.errors import ConfigError
from ftjax.models import ModelConfig, build_model
from ftjax.models.hf import abstract_params, config_from_hf, fetch_config
from ftjax.train.config import execution_options, init_fields
from ftjax.train.optim import build_optimizer
from ftjax.train.parallel import Parallel
from ftjax.train.state import init_state, state_info, step_config
from ftjax.train.targets import Target

GIB = 1024**3


def planned_model_config(mcfg) -> ModelConfig:
    """The model a run would build: the checkpoint's config.json (fetched
    alone) or `model.init`, with the `model` section's execution options."""
    options = execution_options(mcfg)
    if mcfg.checkpoint:
        hf, source = fetch_config(mcfg.checkpoint)
        return config_from_hf(hf, source, **options)
    return ModelConfig(**init_fields(mcfg), **options)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s: the
    largest shard of each leaf (uneven shards are padded to it)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


# The TPU compiler's out-of-memory messages: "Ran out of memory in memory
# space hbm. Used 18.52G of 15.75G hbm. Exceeded hbm capacity by 2.77G.", or
# "the total memory required for HLO temporaries (25.61G) exceeds available
# HBM (15.75G)".
_SIZE = r"([\d.]+)([KMGT]?)"
_OOM_USED = re.compile(rf"Used {_SIZE} of {_SIZE} hbm", re.IGNORECASE)
_OOM_TEMPS = re.compile(
    rf"HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)", re.IGNORECASE
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_oom(message: str) -> tuple[str, int, int] | None:
    """(what was measured, its bytes, bytes available) from a compiler
    out-of-memory message; what is "total" or "temporaries"."""
    for kind, pattern in (("total", _OOM_USED), ("temporaries", _OOM_TEMPS)):
        m = pattern.search(message)
        if m:
            used = float(m.group(1)) * _UNITS[m.group(2).upper()]
            limit = float(m.group(3)) * _UNITS[m.group(4).upper()]
            return kind, int(used), int(limit)
    return None


def _is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def roofline_seconds(flops: float, bytes_accessed: float, target: Target) -> float | None:
    """Lower bound on one step's time on the target: the larger of compute at
    datasheet peak and memory traffic at datasheet bandwidth (per device).
    Real steps are slower (communication, imperfect overlap): an estimate."""
    if not target.peak_flops or not target.hbm_bandwidth:
        return None
    return max(flops / target.peak_flops, bytes_accessed / target.hbm_bandwidth)


def work_flops_per_device(compiled_flops: float, model_flops_step: float, devices: int) -> float:
    """FLOPs a device must do per step, for the roofline. XLA's cost analysis
    counts a loop body once (scanned layers: one layer of many) and a custom
    kernel (splash attention) not at all, so it is a floor; the model's
    FLOPs per token times the step's tokens, spread over the devices, is the
    other: the larger of the two."""
    return max(compiled_flops, model_flops_step / max(devices, 1))


class Prepared(NamedTuple):
    """A run's step laid out for a target, before lowering: the `Parallel`
    that compiles it and the abstract (sharded) state and batch."""

    par: Parallel
    state: Any
    batch: dict
    model_cfg: ModelConfig
    info: Any  # StateInfo
    report: dict  # what is known before compiling


def prepare(cfg, target: Target) -> Prepared:
    """The model, method, optimizer, step options, parallel layout and
    abstract state that `scripts/train.py` would build for `cfg`, on
    `target`'s devices."""
    model_cfg = planned_model_config(cfg.model)
    model = build_model(model_cfg)
    method = peft.build_method(cfg.method)
    tx, schedule = build_optimizer(cfg.optim, int(cfg.train.steps), lr_scales=method.lr_scales())
    tx = method.optimizer(tx, schedule, int(cfg.train.steps), cfg.optim)
    step_cfg = step_config(cfg)
    mode = cfg.parallel.mode
    if mode == "pmap" and target.platform != jax.default_backend():
        raise ConfigError(
            f"parallel.mode='pmap' compiles for attached devices only, not {target.name}; "
            "plan it with parallel.mode='data' or 'fsdp' (the same numbers, and what "
            "scales to pods)"
        )
    offload = bool(cfg.parallel.offload_optimizer)
    par = Parallel(
        mode,
        model,
        tx,
        step_cfg,
        int(cfg.parallel.model_parallel),
        devices=target.devices,
        offload_optimizer=offload,
    )
    batch_size, seq_len = int(cfg.data.batch_size), int(cfg.data.seq_len)
    par.check_batch_size(batch_size, step_cfg.accum_steps)
    seed = int(cfg.train.seed)
    base = abstract_params(model_cfg)
    shapes = jax.eval_shape(lambda b: init_state(b, method, tx, seed), base)
    info = state_info(shapes, method)
    state = par.abstract_state(shapes)
    batch = par.abstract_batch(batch_size, seq_len)
    # pmap stacks one full copy per device: count one copy.
    held = shapes if mode == "pmap" else state
    report = {
        "target": target.name,
        "platform": target.platform,
        "devices": target.num_devices,
        "hosts": target.hosts,
        "device_kind": target.devices[0].device_kind,
        "mode": mode,
        "model": {
            "model_type": model_cfg.model_type,
            "params": info.n_total,
            "trainable": info.n_trainable,
            "dtype": model_cfg.dtype,
            "param_dtype": model_cfg.param_dtype,
            "remat": model_cfg.remat,
            "attention": model_cfg.attention,
            "scan_layers": model_cfg.scan_layers,
        },
        "method": cfg.method.to_dict(),
        "global_batch": batch_size,
        "seq_len": seq_len,
        "accum_steps": step_cfg.accum_steps,
        "loss_chunk": step_cfg.loss_chunk,
        "optimizer_on_host": offload,
        "memory_capacity_bytes": target.memory_bytes,
        "per_device_bytes": {
            "params": per_device_bytes((held.trainable, held.frozen)),
            "trainable_params": per_device_bytes(held.trainable),
            "optimizer_state": per_device_bytes(held.opt_state),
        },
    }
    return Prepared(par, state, batch, model_cfg, info, report)


def plan(cfg, target: Target) -> dict:
    """Compile `cfg`'s train step for `target` and measure it (see module
    docstring). A step that does not fit is a report with `fits: False`."""
    t_start = time.perf_counter()
    prepared = prepare(cfg, target)
    par, state, batch = prepared.par, prepared.state, prepared.batch
    model_cfg, info, report = prepared.model_cfg, prepared.info, prepared.report
    per_device = report["per_device_bytes"]
    batch_size, seq_len = report["global_batch"], report["seq_len"]
    t_lower = time.perf_counter()
    lowered = par.lower_train_step(state, batch)
    t_compile = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 (only the compiler's out-of-memory is a result)
        if not _is_oom(e):
            raise
        used = parse_oom(str(e))
        report.update(
            fits=False,
            compile_error=str(e).strip().splitlines()[0][:500],
            times_s={"lower": t_compile - t_lower, "compile": time.perf_counter() - t_compile},
        )
        if used:
            kind, size, limit = used
            per_device[kind] = size
            if kind == "temporaries":  # the state is held besides them
                held = per_device["params"] + (
                    0 if report["optimizer_on_host"] else per_device["optimizer_state"]
                )
                per_device["total"] = size + held
            report["memory_capacity_bytes"] = limit  # what the compiler could use
            report["margin_bytes"] = limit - per_device["total"]
        return report
    t_done = time.perf_counter()
    mem = compiled.memory_analysis()
    total = _peak_bytes(mem)
    per_device.update(
        arguments=int(mem.argument_size_in_bytes),
        outputs=int(mem.output_size_in_bytes),
        aliased=int(mem.alias_size_in_bytes),
        temporaries=int(mem.temp_size_in_bytes),
        code=int(mem.generated_code_size_in_bytes),
        host_temporaries=int(getattr(mem, "host_temp_size_in_bytes", 0) or 0),
        host_arguments=int(getattr(mem, "host_argument_size_in_bytes", 0) or 0),
        total=total,
    )
    cost = _cost(compiled)
    flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    tokens = batch_size * seq_len
    model_flops_token = info.flops_per_token(model_cfg, seq_len)
    capacity = target.memory_bytes
    work = work_flops_per_device(flops, model_flops_token * tokens, target.num_devices)
    roof = roofline_seconds(work, bytes_accessed, target)
    report.update(
        fits=None if capacity is None else total <= capacity,
        margin_bytes=None if capacity is None else capacity - total,
        compiled_flops_per_device=flops,
        bytes_accessed_per_device=bytes_accessed,
        model_flops_per_token=model_flops_token,
        model_flops_per_step=model_flops_token * tokens,
        estimate={
            "step_time_lower_bound_s": roof,
            "tokens_per_s_upper_bound": None if not roof else tokens / roof,
            "flops_per_device": work,
            "note": "roofline from the datasheet peak FLOP/s and HBM bandwidth per device; "
            "an estimate, not a measurement",
        },
        times_s={
            "build": t_lower - t_start,
            "lower": t_compile - t_lower,
            "compile": t_done - t_compile,
        },
    )
    return report


def _peak_bytes(mem) -> int:
    """Device memory the step needs: live arguments, outputs that are not
    aliased to (donated) arguments, temporaries and code. (The compiler's
    `peak_memory_in_bytes` counts host-offloaded buffers too.)"""
    return int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )


def _gib(n) -> str:
    if n is None:
        return "?"
    if abs(n) < 0.1 * GIB:
        return f"{n / 1024**2:.2f} MiB"
    return f"{n / GIB:.2f} GiB"


def format_report(r: dict) -> str:
    """The report as a few readable lines."""
    b = r["per_device_bytes"]
    m = r["model"]
    method = r["method"].get("name", "?")
    lines = [
        f"target {r['target']}: {r['devices']} x {r['device_kind']} ({r['hosts']} host(s)), "
        f"parallel.mode={r['mode']}",
        f"model {m['model_type']} {m['params'] / 1e6:,.1f}M params, method {method} "
        f"({m['trainable']:,} trainable), batch {r['global_batch']} x {r['seq_len']}, "
        f"dtype {m['dtype']}/{m['param_dtype']}, remat={m['remat']}, attention={m['attention']}",
        f"per device: params {_gib(b['params'])}, optimizer state {_gib(b['optimizer_state'])}"
        + (" (in host memory)" if r.get("optimizer_on_host") else ""),
    ]
    if "outputs" in b:
        host = b.get("host_temporaries", 0) + b.get("host_arguments", 0)
        lines.append(
            f"  temporaries {_gib(b['temporaries'])}, outputs {_gib(b['outputs'])} "
            f"({_gib(b['aliased'])} aliased to donated inputs), total {_gib(b['total'])}"
            + (f"; host memory {_gib(host)}" if host else "")
        )
    capacity = r.get("memory_capacity_bytes")
    if r.get("fits") is None:
        lines.append(f"capacity unknown for this target: total {_gib(b.get('total'))}")
    elif r["fits"]:
        lines.append(
            f"FITS: {_gib(b['total'])} of {_gib(capacity)} "
            f"(margin {_gib(r['margin_bytes'])}, {100 * r['margin_bytes'] / capacity:.0f}%)"
        )
    else:
        lines.append(
            f"DOES NOT FIT: {_gib(b.get('total'))} needed of {_gib(capacity)} per device"
            + (f" ({r['compile_error']})" if "compile_error" in r else "")
        )
    if "compiled_flops_per_device" in r:
        lines.append(
            f"compiled FLOPs per step per device {r['compiled_flops_per_device']:.3e}; "
            f"model FLOPs per token {r['model_flops_per_token']:.3e}"
        )
        est = r["estimate"]["step_time_lower_bound_s"]
        if est:
            lines.append(
                f"estimated step time >= {est:.3f} s (roofline at datasheet peak; estimate), "
                f"<= {r['estimate']['tokens_per_s_upper_bound']:,.0f} tokens/s"
            )
    t = r["times_s"]
    lines.append(f"compile time {t['compile']:.1f} s (lowering {t['lower']:.1f} s)")
    return "\n".join(lines)


def fits_summary(r: dict) -> str:
    """One table cell: total per device / capacity, and the verdict."""
    total = r["per_device_bytes"].get("total")
    verdict = {True: "fits", False: "does not fit", None: "?"}[r.get("fits")]
    cap = r.get("memory_capacity_bytes")
    if total is None or not cap:
        return verdict
    return f"{total / GIB:.1f} / {cap / GIB:.0f} GiB ({verdict})"


__all__ = [
    "Prepared",
    "fits_summary",
    "format_report",
    "parse_oom",
    "per_device_bytes",
    "plan",
    "planned_model_config",
    "prepare",
    "roofline_seconds",
]
