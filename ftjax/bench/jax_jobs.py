"""The JAX jobs: a compiled ftjax train step of one method, and the plain
model's generation. JAX and ftjax's modules load inside the methods, that is in
the worker process, never in the coordinator."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time

import numpy as np

from .config import PEAK_TRIES, method_config, optim_config
from .jobs import InferStep, TrainStep, best_time, synthetic_batch
from .memory import reset_rss_peak, rss_bytes
from .profile import op_breakdown


def host_params(model) -> dict:
    """Random weights made on the host (N(0, 0.02) matrices, unit vectors): the
    numbers do not matter to a benchmark, and a CPU compile of `model.init`
    costs seconds."""
    import jax
    import jax.numpy as jnp

    ids = jnp.zeros((1, 8), jnp.int32)
    if jax.default_backend() != "cpu":  # accelerators compile it fast and fill 1B weights faster
        return jax.jit(model.init)(jax.random.key(0), ids)["params"]
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
    rng = np.random.default_rng(0)

    def make(s):
        if len(s.shape) < 2:
            return np.ones(s.shape, s.dtype)
        x = rng.standard_normal(s.shape, np.float32)
        x *= 0.02
        return x.astype(s.dtype)

    return jax.tree.map(make, shapes["params"])


class JaxJob:
    """Shared by the JAX jobs: platform facts and the in-process matmul peak."""

    def __init__(self, spec: dict):
        import jax

        self.spec = spec
        jax.devices()  # the backend's own memory belongs to the baseline, not to a method
        self.rss_base = rss_bytes()["rss"]

    def _env(self) -> dict:
        import flax
        import jax
        import jaxlib
        import optax

        dev = jax.devices()[0]
        return {
            "backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev)),
            "versions": {
                "jax": jax.__version__,
                "jaxlib": jaxlib.__version__,
                "flax": flax.__version__,
                "optax": optax.__version__,
            },
        }

    def _model_cfg(self, **changes):
        from ftjax.models import ModelConfig

        return ModelConfig(**{**self.spec["model"], **changes})

    def _init_peak(self):
        import jax
        import jax.numpy as jnp

        gpu = jax.default_backend() != "cpu"
        n = self.spec.get("peak_matmul") or (8192 if gpu else 2048)
        dtype = jnp.dtype(self.spec["model"]["dtype"])
        self._peak_reps = 10 if gpu else 1
        self._peak_flops_per_call = 2.0 * n**3
        keys = jax.random.split(jax.random.key(0))
        self._mm_args = [jax.random.normal(k, (n, n), dtype) for k in keys]
        self._mm = jax.jit(jnp.matmul)
        jax.block_until_ready(self._mm(*self._mm_args))

    def measure_peak(self) -> float:
        """FLOP/s of a large matmul in the compute dtype, measured now."""
        import jax

        def call():
            out = None
            for _ in range(self._peak_reps):
                out = self._mm(*self._mm_args)
            jax.block_until_ready(out)

        # Best of three: on a shared CPU one call of a two-thread matmul is often
        # half speed (a descheduled thread), which would inflate MFU.
        return self._peak_reps * self._peak_flops_per_call / best_time(call, PEAK_TRIES)

    def _memory(self) -> dict:
        import jax

        out = {"rss_base": self.rss_base, **rss_bytes()}
        try:
            stats = jax.local_devices()[0].memory_stats() or {}
        except Exception:  # backends without memory statistics
            stats = {}
        if "peak_bytes_in_use" in stats:
            out["device_peak"] = int(stats["peak_bytes_in_use"])
        return out


class JaxTrain(TrainStep, JaxJob):
    def setup(self) -> dict:
        import functools

        import jax

        from ftjax import peft
        from ftjax.models import build_model
        from ftjax.train import Parallel, StepConfig, build_optimizer, init_state, state_info

        spec, cfg = self.spec, self._model_cfg()
        model = build_model(cfg)
        method_cfg = method_config(spec["method"], spec["rank"], spec["alpha"])
        method = peft.build_method({**method_cfg, **spec.get("method_options", {})})
        optim = optim_config()
        tx, schedule = build_optimizer(optim, 1000, lr_scales=method.lr_scales())
        tx = method.optimizer(tx, schedule, 1000, optim)  # GaLore's projection, AdaLoRA's allocator
        params = host_params(model)

        # One program adapts the weights and builds the optimizer state (each
        # eager op would cost a compile on CPU); the float32 base that QLoRA
        # quantizes does not outlive it.
        build = functools.partial(init_state, method=method, tx=tx, seed=0)
        state = jax.jit(build, donate_argnums=0)(params)
        del params
        info = state_info(state, method)
        step_cfg = StepConfig(loss_chunk=spec.get("loss_chunk", -1), penalty=method.penalty())
        par = Parallel("single", model, tx, step_cfg)
        state = par.place_state(state)
        batch = par.place_batch(synthetic_batch(cfg.vocab_size, spec["batch"], spec["seq"]))
        t0 = time.perf_counter()
        lowered = par.lower_train_step(state, batch)
        t1 = time.perf_counter()
        self.compiled = lowered.compile(spec.get("compile_options"))
        t2 = time.perf_counter()
        tokens = spec["batch"] * spec["seq"]
        cost = self.compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
        self.state, self.batch = state, batch
        self.state_bytes = info.nbytes
        if spec.get("measure_peak", True):
            self._init_peak()
        self.peak_reset = reset_rss_peak()
        return {
            **self._env(),
            "params": info.n_total,
            "trainable": info.n_trainable,
            "matmul_params": info.n_matmul,
            "trainable_matmul_params": info.n_trainable_matmul,
            "flops_per_token": info.flops_per_token(cfg, spec["seq"]),
            "xla_flops_per_token": float(cost.get("flops", 0.0)) / tokens,
            "lower_s": t1 - t0,
            "compile_s": t2 - t1,
            "state_bytes": self.state_bytes,
            "tokens_per_step": tokens,
        }

    def _step(self):
        import jax

        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.metrics = metrics

    def profile(self) -> dict:
        """Traces a few steps and sums op time per kind (see `op_breakdown`)."""
        import jax

        trace_dir = tempfile.mkdtemp(prefix="ftjax_bench_trace_")
        n = 3
        t = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            for _ in range(n):
                self._step()
        wall = (time.perf_counter() - t) / n
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        try:
            return op_breakdown(path, self.compiled.as_text(), n, wall)
        finally:
            shutil.rmtree(trace_dir, ignore_errors=True)

    def finish(self) -> dict:
        loss = float(self.metrics["loss"])
        return {"loss": loss, "peak_reset": self.peak_reset, **self._memory()}


class JaxInfer(InferStep, JaxJob):
    """Prefill and per-token decode latency of the plain model via `generate`."""

    def setup(self) -> dict:
        import jax

        from ftjax.models import build_model

        cfg = self._model_cfg(remat=False)
        self.model = build_model(cfg)
        self.params = jax.device_put(host_params(self.model))
        ids = synthetic_batch(cfg.vocab_size, self.spec["batch"], self.spec["seq"])["input_ids"]
        self.prompts = ids.tolist()
        t = time.perf_counter()
        self._generate(1)  # one compiled program serves both token limits below
        return {**self._env(), "compile_s": time.perf_counter() - t}

    def _generate(self, n: int):
        from ftjax.eval.generate import generate

        k = self.spec["decode_tokens"] + 1
        # One multiple for padding and the output buffer: both limits share a program.
        multiple = max(64, -(-k // 64) * 64)
        generate(self.model, self.params, self.prompts, max_new_tokens=n, pad_to_multiple=multiple)

    def finish(self) -> dict:
        return self._memory()
