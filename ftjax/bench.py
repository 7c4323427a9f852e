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

    >>> results = run(BenchConfig(preset="quick", methods=("full", "lora")))
    >>> print(markdown(results))

Workers are `python -m ftjax.bench '<spec json>'`, speaking one JSON line per
command on stdin/stdout (setup, step, profile, finish). `isolate=False` runs the
same jobs in this process instead (tests; per-method RSS is then meaningless).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

# Llama-architecture sizes (ModelConfig fields). `30m` is the issue's default;
# `100m` is where weights and optimizer state dominate memory at batch 1;
# `1b` is TinyLlama-1.1B's shape (grouped-query attention), for GPUs.
PRESETS = {
    "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
    "quick": dict(
        vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4
    ),
    "30m": dict(
        vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8
    ),
    "100m": dict(
        vocab_size=8192, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12
    ),
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
    ),
}
METHODS = ("full", "lora", "dora", "qlora")
PEAK_TRIES = 3  # measured-peak matmuls per round; the fastest counts
TORCH_METHODS = ("full", "lora")  # what transformers + peft run beside ftjax


@dataclasses.dataclass
class BenchConfig:
    preset: str = "30m"
    batch: int = 8
    seq: int = 256
    steps: int = 10  # measured rounds
    warmup: int = 1  # unmeasured rounds after compilation
    methods: tuple = METHODS
    rank: int = 16
    alpha: float = 32.0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # master weights and optimizer state
    scan_layers: bool = False
    remat: bool = False
    torch: bool = True
    inference: bool = True
    decode_tokens: int = 32
    peak_flops: float = 0.0  # datasheet FLOP/s per device, for MFU (b)
    peak_matmul: int = 0  # side of the measured-peak matmul (0: by backend)
    isolate: bool = True  # one worker process per job
    interleave: bool = True  # round-robin rounds; False: one job at a time (GPU)
    memory_preset: str = "100m"  # weights-dominated memory check ("" skips it)
    memory_batch: int = 1
    memory_seq: int = 128
    profile: bool = False  # trace the JAX steps and break their time down by op
    xla_flags: str = ""  # appended to XLA_FLAGS in the workers
    compile_options: dict | None = None  # for the step's compile (tests: optimization level 0)
    patches: tuple = ()  # names in PATCHES, for every ftjax job
    variants: tuple = ()  # extra ftjax jobs "method@variant" (VARIANTS), timed beside the base

    def model_fields(self, preset=None) -> dict:
        name = preset or self.preset
        if name not in PRESETS:
            raise ValueError(f"preset={name!r}; expected one of {', '.join(PRESETS)}")
        fields = {"num_kv_heads": PRESETS[name]["num_heads"], **PRESETS[name]}
        return dict(
            fields,
            max_position_embeddings=max(2048, self.seq + self.decode_tokens + 64),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scan_layers=self.scan_layers,
            remat=self.remat,
        )


QUICK = dict(
    preset="quick",
    batch=4,
    seq=128,
    steps=10,
    warmup=1,
    decode_tokens=8,
    memory_preset="",
)


# ----------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> dict:
    """Current and peak resident set size of this process."""
    return {"rss": _proc_status_kb("VmRSS") * 1024, "rss_peak": _proc_status_kb("VmHWM") * 1024}


def reset_rss_peak() -> bool:
    """Returns freed heap to the OS and restarts the peak-RSS count, so that a
    peak measured afterwards excludes setup transients (e.g. the float32 base
    that QLoRA quantizes). Linux only; False where it is unavailable."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- jobs


def synthetic_batch(vocab: int, batch: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    return {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=1),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


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


def _best_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


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
        return self._peak_reps * self._peak_flops_per_call / _best_time(call, PEAK_TRIES)

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


class JaxTrain(JaxJob):
    def setup(self) -> dict:
        import jax
        import jax.numpy as jnp

        from ftjax import peft
        from ftjax.models import build_model
        from ftjax.train import Parallel, StepConfig, TrainState, build_optimizer
        from ftjax.train import metrics as metrics_lib

        apply_patches(self.spec.get("patches", ()))
        spec, cfg = self.spec, self._model_cfg()
        model = build_model(cfg)
        method = peft.build_method(method_config(spec["method"], spec["rank"], spec["alpha"]))
        tx, _ = build_optimizer(optim_config(), 1000)
        params = host_params(model)

        def initial_state(params):
            trainable, frozen = method.split(method.apply(params, jax.random.key(1)))
            key = jax.random.key_data(jax.random.key(2))
            zero = jnp.zeros((), jnp.int32)
            return TrainState(zero, trainable, frozen, tx.init(trainable), key, zero)

        # One program adapts the weights and builds the optimizer state (each
        # eager op would cost a compile on CPU); the float32 base that QLoRA
        # quantizes does not outlive it.
        state = jax.jit(initial_state, donate_argnums=0)(params)
        shapes = jax.eval_shape(method.apply, params, jax.random.key(1))
        del params
        n_trainable, n_total = method.count(shapes)
        n_matmul, n_trainable_matmul = metrics_lib.matmul_param_counts(
            shapes, method.split(shapes)[0]
        )
        par = Parallel("single", model, tx, StepConfig())
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
        self.state_bytes = {
            "trainable": peft.nbytes(state.trainable),
            "frozen": peft.nbytes(state.frozen),
            "opt_state": sum(x.nbytes for x in jax.tree.leaves(state.opt_state)),
        }
        if spec.get("measure_peak", True):
            self._init_peak()
        self.peak_reset = reset_rss_peak()
        return {
            **self._env(),
            "params": n_total,
            "trainable": n_trainable,
            "matmul_params": n_matmul,
            "trainable_matmul_params": n_trainable_matmul,
            "flops_per_token": metrics_lib.train_flops_per_token(
                n_matmul, n_trainable_matmul, cfg, spec["seq"]
            ),
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

    def step(self) -> dict:
        t = time.perf_counter()
        self._step()
        out = {"step_s": time.perf_counter() - t}
        if self.spec.get("measure_peak", True):
            out["peak_flops"] = self.measure_peak()
        return out

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


class JaxInfer(JaxJob):
    """Prefill and per-token decode latency of the plain model via `generate`."""

    def setup(self) -> dict:
        import jax

        from ftjax.models import build_model

        apply_patches(self.spec.get("patches", ()))
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

    def step(self) -> dict:
        k = self.spec["decode_tokens"]
        prefill = _best_time(lambda: self._generate(1), 1)
        total = _best_time(lambda: self._generate(k + 1), 1)
        return {"prefill_s": prefill, "decode_s": max(total - prefill, 0.0) / k}

    def finish(self) -> dict:
        return self._memory()


class TorchJob:
    def __init__(self, spec: dict):
        import torch
        import transformers

        self.spec, self.torch, self.transformers = spec, torch, transformers
        self.rss_base = rss_bytes()["rss"]
        m = spec["model"]
        self.hf_config = transformers.LlamaConfig(
            vocab_size=m["vocab_size"],
            hidden_size=m["hidden_size"],
            intermediate_size=m["intermediate_size"],
            num_hidden_layers=m["num_layers"],
            num_attention_heads=m["num_heads"],
            num_key_value_heads=m["num_kv_heads"],
            max_position_embeddings=m["max_position_embeddings"],
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        )
        self.autocast = m["dtype"] == "bfloat16"  # mixed precision like ftjax's dtype/param_dtype
        self.ids = torch.from_numpy(
            synthetic_batch(m["vocab_size"], spec["batch"], spec["seq"])["input_ids"]
        ).long()

    def _env(self) -> dict:
        import peft

        return {
            "backend": "cpu",
            "device": platform.processor() or "cpu",
            "threads": self.torch.get_num_threads(),
            "versions": {
                "torch": self.torch.__version__,
                "transformers": self.transformers.__version__,
                "peft": peft.__version__,
            },
        }

    def _model(self):
        self.torch.manual_seed(0)
        model = self.transformers.LlamaForCausalLM(self.hf_config)
        return model

    def _init_peak(self):
        n = self.spec.get("peak_matmul") or 2048
        dtype = self.torch.bfloat16 if self.autocast else self.torch.float32
        self._mm_args = [self.torch.randn(n, n, dtype=dtype) for _ in range(2)]
        self._peak_flops_per_call = 2.0 * n**3
        self.torch.mm(*self._mm_args)

    def measure_peak(self) -> float:
        mm = lambda: self.torch.mm(*self._mm_args)
        return self._peak_flops_per_call / _best_time(mm, PEAK_TRIES)

    def _memory(self) -> dict:
        return {"rss_base": self.rss_base, **rss_bytes()}


class TorchTrain(TorchJob):
    def setup(self) -> dict:
        torch = self.torch
        model = self._model()
        if self.spec["method"] == "lora":
            import peft

            lora = peft.LoraConfig(
                r=self.spec["rank"],
                lora_alpha=self.spec["alpha"],
                target_modules="all-linear",  # every Linear but the output head, as ftjax's preset
                lora_dropout=0.0,
            )
            model = peft.get_peft_model(model, lora)
        elif self.spec["method"] != "full":
            raise ValueError(f"torch column: method {self.spec['method']!r} is not benchmarked")
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        o = optim_config()
        self.opt = torch.optim.AdamW(
            self.params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
        )
        self.targets = torch.roll(self.ids, -1, dims=1)
        t = time.perf_counter()
        self._step()  # eager: the first step allocates optimizer state and caches
        first = time.perf_counter() - t
        self.state_bytes = {
            "trainable": sum(p.numel() * p.element_size() for p in self.params),
            "frozen": sum(
                p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad
            ),
            "opt_state": sum(
                v.numel() * v.element_size()
                for s in self.opt.state.values()
                for v in s.values()
                if torch.is_tensor(v)
            ),
        }
        if self.spec.get("measure_peak", True):
            self._init_peak()
        self.peak_reset = reset_rss_peak()
        return {
            **self._env(),
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in self.params),
            "compile_s": first,
            "state_bytes": self.state_bytes,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        }

    def _step(self):
        torch = self.torch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=self.ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), self.targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, optim_config().clip_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())

    def step(self) -> dict:
        t = time.perf_counter()
        self._step()
        out = {"step_s": time.perf_counter() - t}
        if self.spec.get("measure_peak", True):
            out["peak_flops"] = self.measure_peak()
        return out

    def finish(self) -> dict:
        return {"loss": self.loss, "peak_reset": self.peak_reset, **self._memory()}


class TorchInfer(TorchJob):
    def setup(self) -> dict:
        self.model = self._model().eval()
        t = time.perf_counter()
        self._generate(1)
        return {**self._env(), "compile_s": time.perf_counter() - t}

    def _generate(self, n: int):
        with self.torch.inference_mode():
            self.model.generate(
                self.ids,
                attention_mask=self.torch.ones_like(self.ids),
                max_new_tokens=n,
                min_new_tokens=n,  # no early stop at EOS: both frameworks decode n tokens
                do_sample=False,
                pad_token_id=0,
            )

    def step(self) -> dict:
        k = self.spec["decode_tokens"]
        prefill = _best_time(lambda: self._generate(1), 1)
        total = _best_time(lambda: self._generate(k + 1), 1)
        return {"prefill_s": prefill, "decode_s": max(total - prefill, 0.0) / k}

    def finish(self) -> dict:
        return self._memory()


JOBS = {
    "jax_train": JaxTrain,
    "jax_infer": JaxInfer,
    "torch_train": TorchTrain,
    "torch_infer": TorchInfer,
}


def method_config(name: str, rank: int, alpha: float) -> dict:
    if name == "full":
        return {"name": "full"}
    return {"name": name, "rank": rank, "alpha": alpha, "targets": "all-linear"}


def optim_config():
    """AdamW for both frameworks; a constant schedule so the two do the same math."""
    from ftjax.train import default_optim_config

    cfg = default_optim_config()
    cfg.schedule = "constant"
    return cfg


# ----------------------------------------------------------------------------- patches

# Prototypes of changes to other modules, applied inside a worker before the
# model is built, so that their gain is measured against the unpatched code in
# the same run (as variants, below). Each is a function of no arguments.


def _attention_einsum():
    """Grouped-query attention as two einsums around a float32 softmax, the scale
    folded into q (t*h multiplies instead of t*s), in place of
    `jax.nn.dot_product_attention`'s XLA path."""
    import jax
    import jax.numpy as jnp

    from ftjax.models import layers

    def attention(q, k, v, mask, scale=None):
        b, t, n, h = q.shape
        groups = n // k.shape[2]
        scale = h**-0.5 if scale is None else scale
        q = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, k.shape[2], groups, h)
        s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
        s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(b, t, n, h)

    layers.dot_product_attention = attention


def _qlora_remat():
    """Dequantize an NF4 kernel again in the backward pass rather than keep it:
    without this, XLA saves every layer's dequantized float kernel from the
    forward for `dx = dy @ W.T`, so QLoRA's peak holds a float copy of the whole
    model. `dots_saveable` keeps the matmul output, so only the (elementwise)
    dequantization is recomputed."""
    import jax
    import jax.numpy as jnp

    from ftjax.peft import quant

    def apply_linear(self, x, *, dtype, rng):
        del rng
        matmul = lambda leaf, x: jnp.matmul(x, leaf.materialize(dtype))
        policy = jax.checkpoint_policies.dots_saveable
        return jax.checkpoint(matmul, policy=policy)(self, x)

    quant.NF4Weight.apply_linear = apply_linear


def _grad_barrier():
    """An optimization barrier on the gradient arriving at every projection's
    output. XLA:CPU runs the weight-gradient dots (contracting over tokens) on
    Eigen with the output gradient transposed, and fuses that transpose into the
    gradient's producer (the SiLU backward, say), whose seven-input fusion then
    writes column-wise and becomes the slowest elementwise op of the step. Behind
    the barrier the transpose is a separate, cheap copy."""
    import jax

    from ftjax.models import layers

    @jax.custom_vjp
    def barrier(y):
        return y

    barrier.defvjp(lambda y: (y, None), lambda _, g: (jax.lax.optimization_barrier(g),))
    linear = layers.linear

    def patched(x, kernel, bias=None, *, dtype=None, rng=None):
        return barrier(linear(x, kernel, bias, dtype=dtype, rng=rng))

    layers.linear = patched


def _lora_materialize():
    """An optimization barrier on a LoRA projection's output `x@w + s*(x@a)@b`.
    Without it XLA never writes the sum: every consumer recomputes it from the
    two matmul outputs, and the backward's transposing SiLU-gradient fusion then
    reads six (T, out) arrays column-wise instead of three, the slowest op of a
    LoRA step on CPU. (DoRA's `gain * (...)` materializes its sum, and is faster.)"""
    import jax

    from ftjax.peft.lora import LoraWeight

    apply_linear = LoraWeight.apply_linear

    def patched(self, x, *, dtype, rng):
        return jax.lax.optimization_barrier(apply_linear(self, x, dtype=dtype, rng=rng))

    LoraWeight.apply_linear = patched


PATCHES: dict = {
    "lora_materialize": _lora_materialize,
    "attention_einsum": _attention_einsum,
    "qlora_remat": _qlora_remat,
    "grad_barrier": _grad_barrier,
}

# Named variants of an ftjax job: XLA flags (a user-level setting), model config
# fields, or patches. `--variants=lora@ynn_off` runs LoRA both ways, interleaved.
VARIANTS: dict = {
    "ynn_off": {"xla_flags": "--xla_cpu_experimental_ynn_fusion_type="},  # Eigen dots
    "ynn_all": {
        "xla_flags": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,individual_dot"
    },
    "onednn": {"xla_flags": "--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type="},
    "scan": {"model": {"scan_layers": True}},
    "remat": {"model": {"remat": True}},
    "attention_einsum": {"patches": ["attention_einsum"]},
    "qlora_remat": {"patches": ["qlora_remat"]},
    "grad_barrier": {"patches": ["grad_barrier"]},
    "lora_materialize": {"patches": ["lora_materialize"]},
}


def apply_patches(names) -> None:
    for name in names:
        if name not in PATCHES:
            raise ValueError(f"patches: unknown {name!r}; known: {', '.join(PATCHES) or '(none)'}")
        PATCHES[name]()


# ----------------------------------------------------------------------------- profile

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body)=%?([\w.\-]+)")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONTAINERS = ("while", "conditional", "call")  # their bodies are traced op by op


def _op_kind(opcodes: list) -> str:
    """What an instruction (with the ops of the computations it calls) mostly does."""
    if opcodes[0] in _CONTAINERS:
        return "container"
    if any(o in ("dot", "convolution") for o in opcodes):
        return "matmul"
    if opcodes[0] == "custom-call":
        return "custom-call"
    if any(o in ("gather", "scatter", "dynamic-slice", "dynamic-update-slice") for o in opcodes):
        return "gather/scatter"
    if any(o in ("reduce", "reduce-window", "sort") for o in opcodes):
        return "reduction"
    if all(o in ("copy", "transpose", "parameter", "bitcast", "tuple") for o in opcodes):
        return "copy/transpose"
    return "elementwise"


def _op_source(op_name: str) -> str:
    """Where in the program an op comes from, from its HLO metadata: forward or
    backward, and the module path with layer numbers dropped
    (`bwd mlp/gate_proj`); ops outside the model are the loss and the update."""
    model = re.search(r"jvp\((\w+)\)\)?/(.*)", op_name)
    if not model:
        return "loss, clipping, AdamW update"
    phase = "bwd" if "transpose(jvp(" in op_name else "fwd"
    path = re.sub(r"(^|/)(model|transformer)/", r"\1", model.group(2))
    path = re.sub(r"(layers|h)_\d+/", "", path)
    modules = [p for p in path.split("/")[:-1] if not p.startswith("jit(")]  # last: the primitive
    return f"{phase} {'/'.join(modules[:2]) or 'logits'}"


def _hlo_ops(hlo_text: str) -> dict:
    """name -> (kind, source) of every instruction of an optimized HLO module;
    a fusion's kind is that of the heaviest op it contains."""
    comps, ops, current = {}, {}, None
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m and current is not None:
            name, opcode, rest = m.groups()
            comps[current].append(opcode)
            op_name = _OP_NAME.search(rest)
            ops[name] = (opcode, _CALLS.findall(rest), op_name.group(1) if op_name else "")
            continue
        c = _COMP.match(line)
        if c and "=" not in line.split("{")[0]:
            current = c.group(1)
            comps[current] = []
    return {
        name: (_op_kind([op] + [o for c in called for o in comps.get(c, [])]), _op_source(src))
        for name, (op, called, src) in ops.items()
    }


def op_breakdown(xplane_path: str, hlo_text: str, steps: int, wall_s: float) -> dict:
    """Seconds per step by op kind (matmul, elementwise, ...), by source in the
    model (`bwd mlp/down_proj`, ...) and the costliest ops, from a
    `jax.profiler` trace of `steps` steps."""
    from jax.profiler import ProfileData

    info = _hlo_ops(hlo_text)
    per_op: dict = {}
    for plane in ProfileData.from_file(xplane_path).planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in info and info[ev.name][0] != "container":
                    per_op[ev.name] = per_op.get(ev.name, 0.0) + ev.duration_ns * 1e-9 / steps

    def total(field):
        out: dict = {}
        for name, sec in per_op.items():
            out[info[name][field]] = out.get(info[name][field], 0.0) + sec
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:40]
    return {
        "wall_s": wall_s,
        "op_s": sum(per_op.values()),
        "by_kind": total(0),
        "by_source": total(1),
        "top_ops": [{"op": n, "kind": info[n][0], "source": info[n][1], "s": t} for n, t in top],
    }


# ----------------------------------------------------------------------------- workers


def _worker_main(argv) -> None:
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
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
            raise ValueError(f"{self.name}: XLA flags need a fresh process (isolate=True)")
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


def _worker_env(bc: BenchConfig) -> dict:
    env = dict(os.environ)
    # Tests simulate 8 CPU devices; a benchmark worker wants one device with all cores.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = " ".join(f for f in (flags.strip(), bc.xla_flags) if f)
    if bc.interleave:  # several JAX processes share one accelerator
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # compile times are measured, not cache reads
    return env


# ----------------------------------------------------------------------------- coordinator


def _base_spec(bc: BenchConfig, preset=None) -> dict:
    return dict(
        model=bc.model_fields(preset),
        batch=bc.batch,
        seq=bc.seq,
        rank=bc.rank,
        alpha=bc.alpha,
        decode_tokens=bc.decode_tokens,
        peak_matmul=bc.peak_matmul,
        patches=list(bc.patches),
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
            raise ValueError(
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
                patches=spec["patches"] + list(v.get("patches", ())),
                xla_flags=v.get("xla_flags", ""),
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
    make = (lambda s: Worker(s, _worker_env(bc))) if bc.isolate else InProcess
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


# ----------------------------------------------------------------------------- results


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _per_round(a: dict, key: str, fn) -> float | None:
    """Median over rounds of fn(round result) for one job."""
    return _median([fn(r) if r else None for r in a["rounds"]] if a else [])


def _paired(a: dict | None, b: dict | None, key: str) -> float | None:
    """Median over rounds of b[key] / a[key]: a ratio measured round by round."""
    if not a or not b:
        return None
    return _median(
        [rb[key] / ra[key] for ra, rb in zip(a["rounds"], b["rounds"]) if ra and rb and ra[key]]
    )


def machine() -> dict:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            model,
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def summarize(bc: BenchConfig, jobs: dict, memory: dict) -> dict:
    train = {n: j for n, j in jobs.items() if j["spec"]["kind"].endswith("train")}
    ftjax = {
        j["spec"]["method"]: j
        for j in train.values()
        if j["spec"]["framework"] == "ftjax" and not j["spec"].get("variant")
    }
    torch = {j["spec"]["method"]: j for j in train.values() if j["spec"]["framework"] == "torch"}
    rows = []
    for name, j in train.items():
        s, method = j.get("setup") or {}, j["spec"]["method"]
        step_s = _per_round(j, "step_s", lambda r: r["step_s"])
        # Both frameworks run the same model math: the closed form is ftjax's.
        fpt = (ftjax.get(method, {}).get("setup") or {}).get("flops_per_token")
        tokens = bc.batch * bc.seq
        mfu = None
        if fpt:
            mfu = _per_round(j, "", lambda r, f=fpt * tokens: f / r["step_s"] / r["peak_flops"])
        fw, variant = j["spec"]["framework"], j["spec"].get("variant")
        rows.append(
            {
                "name": name,
                "framework": fw,
                "method": method,
                "variant": variant,
                "speedup_vs_base": _paired(j, ftjax.get(method), "step_s") if variant else None,
                "params": s.get("params"),
                "trainable": s.get("trainable"),
                "compile_s": s.get("compile_s"),
                "lower_s": s.get("lower_s"),
                "step_s": step_s,
                "step_s_rounds": [r["step_s"] if r else None for r in j["rounds"]],
                # Extremes: on a shared host the quietest round is the closest to
                # the machine's own speed (a cross-check of the medians).
                "peak_flops_rounds": [r.get("peak_flops") if r else None for r in j["rounds"]],
                "step_s_min": min((r["step_s"] for r in j["rounds"] if r), default=None),
                "peak_flops_max": max(
                    (r["peak_flops"] for r in j["rounds"] if r and r.get("peak_flops")),
                    default=None,
                ),
                "tokens_per_s": tokens / step_s if step_s else None,
                "speedup_vs_full": _paired(
                    j, (ftjax if fw == "ftjax" else torch).get("full"), "step_s"
                ),
                "speedup_vs_torch": _paired(j, torch.get(method), "step_s")
                if fw == "ftjax"
                else None,
                "flops_per_token": fpt,
                "xla_flops_per_token": s.get("xla_flops_per_token"),
                "peak_flops_measured": _per_round(j, "", lambda r: r.get("peak_flops")),
                "mfu_measured_peak": mfu,
                "mfu_datasheet": fpt * tokens / step_s / bc.peak_flops
                if (fpt and step_s and bc.peak_flops)
                else None,
                "state_bytes": s.get("state_bytes"),
                "memory": j.get("finish"),
                "loss": (j.get("finish") or {}).get("loss"),
                "profile": j.get("profile"),
                "error": j.get("error"),
            }
        )
    infer = []
    by_fw = {
        j["spec"]["framework"]: j for j in jobs.values() if j["spec"]["kind"].endswith("infer")
    }
    for fw, j in by_fw.items():
        other = by_fw.get("torch") if fw == "ftjax" else None
        infer.append(
            {
                "framework": fw,
                "compile_s": (j.get("setup") or {}).get("compile_s"),
                "prefill_s": _per_round(j, "", lambda r: r["prefill_s"]),
                "decode_s_per_token": _per_round(j, "", lambda r: r["decode_s"]),
                "prefill_speedup_vs_torch": _paired(j, other, "prefill_s"),
                "decode_speedup_vs_torch": _paired(j, other, "decode_s"),
                "error": j.get("error"),
            }
        )
    mem_rows = [
        {
            "name": n,
            "framework": j["spec"]["framework"],
            "method": j["spec"]["method"],
            "variant": j["spec"].get("variant"),
            "state_bytes": (j.get("setup") or {}).get("state_bytes"),
            **(j.get("finish") or {}),
            "error": j.get("error"),
        }
        for n, j in memory.items()
    ]
    env = next(
        (j["setup"] for j in jobs.values() if j.get("setup") and "backend" in j["setup"]), {}
    )
    versions = {}
    for j in jobs.values():
        versions.update((j.get("setup") or {}).get("versions", {}))
    for row in rows:
        best = row["flops_per_token"] and row["step_s_min"] and row["peak_flops_max"]
        row["mfu_best"] = (
            row["flops_per_token"] * bc.batch * bc.seq / row["step_s_min"] / row["peak_flops_max"]
            if best
            else None
        )
    results = {
        "config": dataclasses.asdict(bc),
        "model": bc.model_fields(),
        "machine": {**machine(), "backend": env.get("backend"), "device": env.get("device")},
        "versions": versions,
        "tunix": "not installed (column skipped)" if not _tunix() else "installed; no column yet",
        "train": rows,
        "inference": infer,
        "memory": mem_rows,
    }
    results["goals"] = goals(results)
    return results


def _tunix() -> bool:
    import importlib.util

    return importlib.util.find_spec("tunix") is not None


def goals(results: dict) -> list[dict]:
    """The issue's goals, each with its measured value (None: not measured)."""
    base = [r for r in results["train"] if not r.get("variant")]
    row = {(r["framework"], r["method"]): r for r in base}
    get = lambda fw, m, k: (row.get((fw, m)) or {}).get(k)
    gpu = results["machine"].get("backend") not in (None, "cpu")
    mfu = get("ftjax", "full", "mfu_datasheet" if gpu else "mfu_measured_peak")
    # The dedicated weights-dominated check when it ran, else the timing run's peaks.
    mem_rows = [r for r in results["memory"] if not r.get("variant")] or [
        {"framework": r["framework"], "method": r["method"], **(r["memory"] or {})} for r in base
    ]
    key = "device_peak" if gpu else "rss_peak"
    mem = {(r["framework"], r["method"]): r.get(key) for r in mem_rows}
    mem_ratio = None
    if mem.get(("ftjax", "lora")) and mem.get(("ftjax", "full")):
        mem_ratio = mem[("ftjax", "lora")] / mem[("ftjax", "full")]
    spec = [
        (
            "ftjax LoRA step >= 1.25x faster than full tuning",
            get("ftjax", "lora", "speedup_vs_full"),
            ">=",
            1.25,
        ),
        (
            "ftjax full tokens/s >= PyTorch full",
            get("ftjax", "full", "speedup_vs_torch"),
            ">=",
            1.0,
        ),
        (
            "ftjax LoRA tokens/s >= 2x PyTorch + PEFT LoRA",
            get("ftjax", "lora", "speedup_vs_torch"),
            ">=",
            2.0,
        ),
        (
            "full-tuning MFU >= 45% of the bf16 datasheet peak"
            if gpu
            else "full-tuning MFU >= 60% of the measured matmul peak",
            mfu,
            ">=",
            0.45 if gpu else 0.60,
        ),
        ("LoRA peak memory <= 0.5x full (weights-dominated size)", mem_ratio, "<=", 0.5),
    ]
    return [
        {
            "goal": g,
            "measured": v,
            "target": t,
            "met": None if v is None else (v >= t if op == ">=" else v <= t),
        }
        for g, v, op, t in spec
    ]


def _f(x, spec=".3g", scale=None, suffix=""):
    return "–" if x is None else f"{x if scale is None else x * scale:{spec}}{suffix}"


def _mb(x):
    return _f(x, ".0f", 1 / 2**20)


def markdown(results: dict) -> str:
    """The results as markdown tables (training, inference, memory, goals, profile)."""
    bc, m = results["config"], results["model"]
    lines = [
        f"Model: Llama-architecture `{bc['preset']}` (hidden {m['hidden_size']}, "
        f"{m['num_layers']} layers, {m['num_heads']}/{m['num_kv_heads']} heads, "
        f"MLP {m['intermediate_size']}, vocab {m['vocab_size']}), batch {bc['batch']} x seq "
        f"{bc['seq']}, compute {bc['dtype']}, params {bc['param_dtype']}, AdamW; "
        f"{bc['steps']} measured rounds after {bc['warmup']} warm-up. "
        f"Ratios are medians of per-round ratios.",
        "",
        "| framework | method | trainable / total | compile s | step s (quietest) | tokens/s | vs full "
        "| vs torch | vs base | GFLOP/token (model / XLA) | matmul peak GFLOP/s | MFU vs measured peak (median / quietest) "
        "| MFU (datasheet) | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["train"]:
        label = r["method"] + (f"@{r['variant']}" if r.get("variant") else "")
        if r["error"]:
            lines.append(f"| {r['framework']} | {label} | failed: {r['error'][:80]} |")
            continue
        mem = r["memory"] or {}
        lines.append(
            f"| {r['framework']} | {label} | {_f(r['trainable'], ',')} / "
            f"{_f(r['params'], ',')} | {_f(r['compile_s'], '.1f')} | {_f(r['step_s'], '.3f')} "
            f"({_f(r['step_s_min'], '.3f')}) "
            f"| {_f(r['tokens_per_s'], ',.0f')} | {_f(r['speedup_vs_full'], '.2f', suffix='x')} "
            f"| {_f(r['speedup_vs_torch'], '.2f', suffix='x')} "
            f"| {_f(r['speedup_vs_base'], '.2f', suffix='x')} "
            f"| {_f(r['flops_per_token'], '.3g', 1e-9)} / {_f(r['xla_flops_per_token'], '.3g', 1e-9)} "
            f"| {_f(r['peak_flops_measured'], '.0f', 1e-9)} "
            f"| {_f(r['mfu_measured_peak'], '.0%')} / {_f(r['mfu_best'], '.0%')} "
            f"| {_f(r['mfu_datasheet'], '.1%')} "
            f"| {_mb(mem.get('rss_peak'))} |"
        )
    if results["inference"]:
        lines += [
            "",
            f"Inference (plain model, batch {bc['batch']}, prompt {bc['seq']}, "
            f"{bc['decode_tokens']} decoded tokens, greedy, KV cache):",
            "",
            "| framework | prefill ms | decode ms/token | prefill vs torch | decode vs torch |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in results["inference"]:
            lines.append(
                f"| {r['framework']} | {_f(r['prefill_s'], '.1f', 1e3)} "
                f"| {_f(r['decode_s_per_token'], '.2f', 1e3)} "
                f"| {_f(r['prefill_speedup_vs_torch'], '.2f', suffix='x')} "
                f"| {_f(r['decode_speedup_vs_torch'], '.2f', suffix='x')} |"
            )
    if results["memory"]:
        lines += [
            "",
            f"Memory where weights and optimizer state dominate: `{bc['memory_preset']}`, batch "
            f"{bc['memory_batch']} x seq {bc['memory_seq']}; training-phase peak of each "
            "method's own process (setup transients excluded):",
            "",
            "| framework | method | weights + grads-free state MB (trainable / frozen / optimizer) "
            "| process base MB | peak RSS MB | peak above base MB | device peak MB |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in results["memory"]:
            if r.get("variant"):
                r = {**r, "method": f"{r['method']}@{r['variant']}"}
            sb = r.get("state_bytes") or {}
            above = r["rss_peak"] - r["rss_base"] if r.get("rss_peak") else None
            lines.append(
                f"| {r['framework']} | {r['method']} | {_mb(sb.get('trainable'))} / "
                f"{_mb(sb.get('frozen'))} / {_mb(sb.get('opt_state'))} | {_mb(r.get('rss_base'))} "
                f"| {_mb(r.get('rss_peak'))} | {_mb(above)} | {_mb(r.get('device_peak'))} |"
            )
    lines += ["", "| goal | measured | target | met |", "|---|---:|---:|---|"]
    for g in results["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {_f(g['measured'], '.2f')} | {g['target']} | {met} |")
    for r in results["train"]:
        p = r.get("profile")
        if not p:
            continue
        lines += [
            "",
            f"Profile of {r['name']}: {p['wall_s'] * 1e3:.0f} ms/step traced, "
            f"{p['op_s'] * 1e3:.0f} ms in XLA ops",
            "",
            "| op kind | ms/step | share |",
            "|---|---:|---:|",
        ]
        for kind, s in p["by_kind"].items():
            lines.append(f"| {kind} | {s * 1e3:.1f} | {s / p['wall_s']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _worker_main(sys.argv)
