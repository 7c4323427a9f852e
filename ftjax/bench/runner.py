"""The coordinator: the jobs a `BenchConfig` makes, and the rounds that drive
their workers. Imports only the stdlib and numpy; the frameworks load in the
workers."""

from __future__ import annotations

import time

from ftjax.errors import ConfigError

from .config import METHODS, TORCH_METHODS, BenchConfig
from .results import summarize
from .variants import VARIANTS
from .workers import InProcess, Worker, WorkerError, worker_env


def _base_spec(bc: BenchConfig, preset=None) -> dict:
    return dict(
        model=bc.model_fields(preset),
        batch=bc.batch,
        seq=bc.seq,
        rank=bc.rank,
        alpha=bc.alpha,
        decode_tokens=bc.decode_tokens,
        peak_matmul=bc.peak_matmul,
        compile_options=bc.compile_options,
    )


def _torch_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))


def _variant_specs(bc: BenchConfig, train) -> list[dict]:
    """The ftjax jobs of `bc.variants` ("method@variant"), from the job maker `train`."""
    specs = []
    for item in bc.variants:
        method, _, label = item.partition("@")
        if method not in METHODS or label not in VARIANTS:
            raise ConfigError(
                f"variants: {item!r} is not method@variant with a method in {', '.join(METHODS)} "
                f"and a variant in {', '.join(VARIANTS)}"
            )
        v, spec = VARIANTS[label], train("jax_train", "ftjax", method)
        specs.append(
            dict(
                spec,
                name=f"ftjax/{item}",
                variant=label,
                model={**spec["model"], **v.get("model", {})},
                xla_flags=v.get("xla_flags", ""),
                method_options={**spec.get("method_options", {}), **v.get("method", {})},
                loss_chunk=v.get("loss_chunk", spec.get("loss_chunk", -1)),
            )
        )
    return specs


def job_specs(bc: BenchConfig) -> list[dict]:
    base = _base_spec(bc)
    train = lambda kind, fw, m: dict(base, kind=kind, name=f"{fw}/{m}", framework=fw, method=m)
    specs = [train("jax_train", "ftjax", m) for m in bc.methods]
    specs += _variant_specs(bc, train)
    torch = bc.torch and _torch_available()
    if torch:
        specs += [train("torch_train", "torch", m) for m in TORCH_METHODS if m in bc.methods]
    if bc.inference:
        specs.append(dict(base, kind="jax_infer", name="ftjax/infer", framework="ftjax"))
        if torch:
            specs.append(dict(base, kind="torch_infer", name="torch/infer", framework="torch"))
    return specs


def memory_specs(bc: BenchConfig) -> list[dict]:
    base = dict(
        _base_spec(bc, bc.memory_preset),
        batch=bc.memory_batch,
        seq=bc.memory_seq,
        measure_peak=False,
    )
    train = lambda kind, fw, m: dict(base, kind=kind, name=f"{fw}/{m}", framework=fw, method=m)
    specs = [train("jax_train", "ftjax", m) for m in bc.methods] + _variant_specs(bc, train)
    if bc.torch and _torch_available():
        specs += [train("torch_train", "torch", m) for m in TORCH_METHODS if m in bc.methods]
    return specs


def run_jobs(specs, bc: BenchConfig, *, steps, warmup, interleave, profile=False, log=print):
    """{name: {"spec", "setup", "rounds": [step result or None], "finish", "profile", "error"}}."""
    make = (lambda s: Worker(s, worker_env(bc))) if bc.isolate else InProcess
    out = {s["name"]: {"spec": s, "rounds": [None] * steps} for s in specs}
    live: dict = {}

    def fail(name, err):
        out[name]["error"] = str(err).strip().splitlines()[-1][:300]
        log(f"  {name}: FAILED {out[name]['error']}")
        if name in live:
            live.pop(name).close()

    def call(name, cmd):
        try:
            return live[name].call(cmd)
        except WorkerError as e:
            fail(name, e)
            return None

    def start(spec):
        try:
            live[spec["name"]] = make(spec)
        except Exception as e:  # in-process job construction (e.g. a missing library)
            fail(spec["name"], e)

    def setup(name):
        t = time.perf_counter()
        if name in live and (res := call(name, "setup")) is not None:
            out[name]["setup"] = res
            log(f"  {name}: ready in {time.perf_counter() - t:.1f}s")

    def steps_of(names, r):
        for name in names:
            if name in live and (res := call(name, "step")) is not None and r >= warmup:
                out[name]["rounds"][r - warmup] = res

    def finish(name):
        if name in live:
            if profile and out[name]["spec"]["kind"] == "jax_train":
                out[name]["profile"] = call(name, "profile")
            if name in live and (res := call(name, "finish")) is not None:
                out[name]["finish"] = res
            if name in live:
                live.pop(name).close()

    try:
        if interleave:
            for spec in specs:  # all processes start at once: their imports overlap
                start(spec)
            for spec in specs:
                setup(spec["name"])
            names = [s["name"] for s in specs]
            for r in range(warmup + steps):
                k = r % len(names)  # rotate who goes first: no job always follows another
                steps_of(names[k:] + names[:k], r)
                log(f"  round {r + 1}/{warmup + steps}" + (" (warm-up)" if r < warmup else ""))
            for name in names:
                finish(name)
        else:
            for spec in specs:
                start(spec)
                setup(spec["name"])
                for r in range(warmup + steps):
                    steps_of([spec["name"]], r)
                finish(spec["name"])
                log(f"  {spec['name']}: done")
    finally:
        for w in live.values():
            w.close()
    return out


def run(bc: BenchConfig, log=print) -> dict:
    """Runs the benchmark and returns the results dict (see `summarize`)."""
    t0 = time.perf_counter()
    log(f"timing: {bc.preset}, batch {bc.batch} x seq {bc.seq}, {bc.dtype}")
    jobs = run_jobs(
        job_specs(bc),
        bc,
        steps=bc.steps,
        warmup=bc.warmup,
        interleave=bc.interleave,
        profile=bc.profile,
        log=log,
    )
    memory = {}
    if bc.memory_preset and bc.isolate:
        log(f"memory: {bc.memory_preset}, batch {bc.memory_batch} x seq {bc.memory_seq}")
        memory = run_jobs(memory_specs(bc), bc, steps=2, warmup=0, interleave=False, log=log)
    results = summarize(bc, jobs, memory)
    results["wall_s"] = time.perf_counter() - t0
    return results
