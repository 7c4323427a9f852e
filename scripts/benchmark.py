"""Step time, tokens/s, MFU and memory per fine-tuning method, beside PyTorch + PEFT.

    python scripts/benchmark.py --out=/tmp/bench/results.json            # ~7 min on 2 idle cores
    python scripts/benchmark.py --quick --out=/tmp/bench/quick.json      # ~1 min
    python scripts/benchmark.py --preset=1b --dtype=bfloat16 --no-torch --peak_flops=989e12 \\
        --no-interleave --scan_layers                                     # a GPU

Prints a markdown table and writes it next to the JSON (`<out>.md`). See
`ftjax/bench/` (its `__init__` docstring) for what is measured and how, and
docs/benchmarks.md for results.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _cli import parse_flags, run_main  # noqa: E402
from absl import app, flags  # noqa: E402

from ftjax import bench  # noqa: E402  (stdlib and numpy only: frameworks load in workers)
from ftjax.errors import ConfigError  # noqa: E402
from ftjax.rundir import make_dirs, write_text_atomic  # noqa: E402

D = bench.BenchConfig()
_PRESET = flags.DEFINE_string("preset", D.preset, "Model size: tiny, quick, 30m, 100m, 1b.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Small model, batch 4 x 128, no memory check: about a minute."
)
_BATCH = flags.DEFINE_integer("batch", None, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq", None, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", D.steps, "Measured rounds (one step per job each).")
_WARMUP = flags.DEFINE_integer("warmup", D.warmup, "Unmeasured rounds after compilation.")
_METHODS = flags.DEFINE_list(
    "methods", list(D.methods), "ftjax methods: any registered method, or all (method_config)."
)
_RANK = flags.DEFINE_integer("rank", D.rank, "LoRA / DoRA / QLoRA rank (all-linear targets).")
_DTYPE = flags.DEFINE_enum("dtype", D.dtype, ["float32", "bfloat16"], "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", D.param_dtype, ["float32", "bfloat16"], "Weights and optimizer state."
)
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "Datasheet peak FLOP/s per device for MFU (b).")
_TORCH = flags.DEFINE_bool("torch", True, "Run PyTorch + transformers + peft beside ftjax.")
_INFER = flags.DEFINE_bool("inference", True, "Measure prefill and decode latency.")
_DECODE = flags.DEFINE_integer("decode_tokens", None, "Decoded tokens for the latency.")
_MEMORY = flags.DEFINE_string(
    "memory_preset", None, "Preset for the weights-dominated memory check ('' skips it)."
)
_INTERLEAVE = flags.DEFINE_bool(
    "interleave", D.interleave, "Round-robin the jobs (noisy shared CPUs); off: one at a time."
)
_ISOLATE = flags.DEFINE_bool("isolate", D.isolate, "One process per job (per-method RSS).")
_PROFILE = flags.DEFINE_bool("profile", False, "Trace the ftjax steps; time per op kind.")
_SCAN = flags.DEFINE_bool("scan_layers", D.scan_layers, "nn.scan over layers (faster compile).")
_REMAT = flags.DEFINE_bool("remat", D.remat, "Recompute layer activations in the backward.")
_XLA = flags.DEFINE_string("xla_flags", "", "Extra XLA_FLAGS for the workers.")
_VARIANTS = flags.DEFINE_list(
    "variants", [], "Extra ftjax jobs method@variant (ftjax.bench.VARIANTS), timed beside the base."
)
_OUT = flags.DEFINE_string("out", None, "Results JSON path; the table goes to <out>.md.")


def main(argv):
    del argv
    cfg = bench.BenchConfig(**(bench.QUICK if _QUICK.value else {}))
    if not _QUICK.value or _PRESET.present:
        cfg.preset = _PRESET.value
    for name, flag in (
        ("batch", _BATCH),
        ("seq", _SEQ),
        ("decode_tokens", _DECODE),
        ("memory_preset", _MEMORY),
    ):
        if flag.value is not None:
            setattr(cfg, name, flag.value)
    for name, flag in (("steps", _STEPS), ("warmup", _WARMUP)):
        if flag.present or not _QUICK.value:
            setattr(cfg, name, flag.value)
    from ftjax.peft import known_methods

    methods = _METHODS.value
    if methods == ["all"]:
        methods = list(known_methods())
    unknown = sorted(set(methods) - set(known_methods()))
    if unknown:
        raise ConfigError(
            f"--methods: unknown {unknown[0]!r}; known: all, {', '.join(known_methods())}"
        )
    cfg.model_fields()  # validates the preset
    if cfg.steps < 1 or cfg.batch < 1 or cfg.seq < 2:
        raise ConfigError("--steps, --batch must be >= 1 and --seq >= 2")
    cfg.methods = tuple(methods)
    cfg.rank, cfg.dtype, cfg.param_dtype = _RANK.value, _DTYPE.value, _PARAM_DTYPE.value
    cfg.peak_flops, cfg.torch, cfg.inference = _PEAK.value, _TORCH.value, _INFER.value
    cfg.interleave, cfg.isolate, cfg.profile = _INTERLEAVE.value, _ISOLATE.value, _PROFILE.value
    cfg.scan_layers, cfg.remat = _SCAN.value, _REMAT.value
    cfg.xla_flags = _XLA.value
    cfg.variants = tuple(_VARIANTS.value)
    bench.job_specs(cfg)  # validates the variants before any worker starts
    if _OUT.value:  # a bad --out fails now, not after the measurements
        make_dirs(os.path.dirname(os.path.abspath(_OUT.value)), "--out")

    results = bench.run(cfg)
    results["command"] = " ".join(["python"] + sys.argv)
    table = bench.markdown(results)
    print(table)
    print(f"(benchmark wall time {results['wall_s']:.0f}s)")
    if _OUT.value:
        write_text_atomic(_OUT.value, json.dumps(results, indent=1))
        write_text_atomic(_OUT.value + ".md", f"`{results['command']}`\n\n{table}\n")
        print(f"wrote {_OUT.value} and {_OUT.value}.md")


if __name__ == "__main__":
    # absl negates booleans as --noflag; accept the common --no-flag spelling too.
    sys.argv = ["--no" + a[5:] if a.startswith("--no-") else a for a in sys.argv]
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
