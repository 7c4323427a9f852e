"""What a benchmark run measures: the model sizes, the methods, the run's
settings (`BenchConfig`), and the method and optimizer configs both frameworks
share."""

from __future__ import annotations

import dataclasses

from ftjax.errors import ConfigError

# Llama-architecture sizes (ModelConfig fields). `30m` is the default;
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
    variants: tuple = ()  # extra ftjax jobs "method@variant" (VARIANTS), timed beside the base

    def model_fields(self, preset=None) -> dict:
        name = preset or self.preset
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r}; expected one of {', '.join(PRESETS)}")
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


# Settings of methods whose size is not `rank` on all-linear targets (every
# registered method can be benchmarked: `--methods=ia3,vera,...`).
METHOD_EXTRAS = {
    "adalora": lambda rank: {"init_r": rank + rank // 2, "target_r": rank},
    "vera": lambda rank: {"rank": 16 * rank},  # VeRA's shared rank is large (256-1024 in its paper)
    "freeze": lambda rank: {"last_layers": 1},
    "oft": lambda rank: {"rank": 0, "block_size": 32},  # OFT is sized by its block, not a rank
    "prompt_tuning": lambda rank: {"num_virtual_tokens": 16},
    "prefix_tuning": lambda rank: {"num_virtual_tokens": 16},
}
# Methods whose own default targets are the point of the method (IA3: k, v, MLP down).
OWN_TARGETS = ("ia3",)


def method_config(name: str, rank: int, alpha: float) -> dict:
    """The benchmark's config of method `name`: `rank` and `alpha` where the
    method has them, all-linear targets, then the method's `METHOD_EXTRAS`."""
    from ftjax.peft.registry import get

    options = get(name).options
    cfg = {"name": name}
    if "rank" in options:
        cfg["rank"] = rank
    if "alpha" in options:
        cfg["alpha"] = alpha
    if "targets" in options and name not in OWN_TARGETS:
        cfg["targets"] = "all-linear"
    if name in METHOD_EXTRAS:
        cfg.update(METHOD_EXTRAS[name](rank))
    return cfg


def optim_config():
    """AdamW for both frameworks; a constant schedule so the two do the same math."""
    from ftjax.train import default_optim_config

    cfg = default_optim_config()
    cfg.schedule = "constant"
    return cfg
