"""The benchmark's quick path, in process on a tiny model: every job runs, the
results are well formed, and the FLOPs and trainable counts it reports equal
closed forms computed here from the config alone. Nothing about speed is
asserted: timings on a shared CPU are noise."""

import importlib.util
import math

import numpy as np
import pytest

from ftjax import bench

RANK = 4
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))


@pytest.fixture(scope="module")
def results():
    cfg = bench.BenchConfig(
        preset="tiny",
        batch=2,
        seq=16,
        steps=2,
        warmup=0,
        methods=("full", "lora"),
        rank=RANK,
        decode_tokens=2,
        peak_matmul=128,
        memory_preset="",
        isolate=False,
        torch=HAS_TORCH,
        profile=True,
        peak_flops=1e12,
        compile_options={"xla_backend_optimization_level": 0},  # halves compile time
    )
    return bench.run(cfg, log=lambda msg: None)


def llama_matmul_params(m) -> int:
    """Weights in matmuls: q, k, v, o, gate, up, down per layer and the output head."""
    d, inter, hd = m["hidden_size"], m["intermediate_size"], m["hidden_size"] // m["num_heads"]
    q = o = d * m["num_heads"] * hd
    kv = 2 * d * m["num_kv_heads"] * hd
    return m["num_layers"] * (q + kv + o + 3 * d * inter) + d * m["vocab_size"]


def lora_trainable(m, r) -> int:
    """sum over adapted (in, out) kernels of r * (in + out), all-linear targets."""
    d, inter, hd = m["hidden_size"], m["intermediate_size"], m["hidden_size"] // m["num_heads"]
    h, k = m["num_heads"] * hd, m["num_kv_heads"] * hd
    shapes = [(d, h), (d, k), (d, k), (h, d), (d, inter), (d, inter), (inter, d)]
    return m["num_layers"] * sum(r * (i + o) for i, o in shapes)


def paired_median(mine, other) -> float:
    """Median of other/mine over rounds: how many times faster `mine` ran."""
    return float(np.median([o / m for m, o in zip(mine, other)]))


def rows(results):
    return {(r["framework"], r["method"]): r for r in results["train"]}


@pytest.mark.slow
def test_every_job_ran_and_its_figures_follow_from_its_rounds(results):
    expected = {("ftjax", "full"), ("ftjax", "lora")}
    if HAS_TORCH:
        expected |= {("torch", "full"), ("torch", "lora")}
    assert set(rows(results)) == expected
    tokens = results["config"]["batch"] * results["config"]["seq"]
    for r in results["train"]:
        assert r["error"] is None, r["error"]
        assert len(r["step_s_rounds"]) == 2 and all(t > 0 for t in r["step_s_rounds"])
        assert r["compile_s"] > 0 and math.isfinite(r["loss"])
        # Every derived figure is recomputed here from the per-round measurements.
        steps, peaks = np.array(r["step_s_rounds"]), np.array(r["peak_flops_rounds"])
        assert r["step_s"] == pytest.approx(np.median(steps))
        assert r["step_s_min"] == steps.min()
        assert r["tokens_per_s"] == pytest.approx(tokens / np.median(steps))
        assert r["peak_flops_measured"] == pytest.approx(np.median(peaks))
        assert r["peak_flops_max"] == peaks.max()
        flops = r["flops_per_token"] * tokens  # ftjax's closed form, for both frameworks
        assert r["mfu_measured_peak"] == pytest.approx(np.median(flops / steps / peaks))
        assert r["mfu_datasheet"] == pytest.approx(flops / np.median(steps) / 1e12)
    for r in results["inference"]:
        assert r["error"] is None, r["error"]
        assert r["prefill_s"] > 0 and r["decode_s_per_token"] >= 0
    assert len(results["goals"]) == 5
    # Each goal's verdict is its measured value against its target, recomputed
    # here from the rows: LoRA's speed-up over full, and the memory ratio.
    by_name = {g["goal"]: g for g in results["goals"]}
    speed = by_name["ftjax LoRA step >= 1.25x faster than full tuning"]
    want = rows(results)[("ftjax", "lora")]["speedup_vs_full"]
    assert speed["measured"] == pytest.approx(want) and speed["met"] == (want >= 1.25)
    if HAS_TORCH:
        torch_goal = by_name["ftjax full tokens/s >= PyTorch full"]
        full = rows(results)[("ftjax", "full")]
        assert torch_goal["met"] == (full["speedup_vs_torch"] >= 1.0)


@pytest.mark.slow
def test_full_tuning_flops_are_6n_plus_attention(results):
    m = results["model"]
    n = llama_matmul_params(m)
    attention = 12 * m["num_layers"] * results["config"]["seq"] * m["hidden_size"]
    full = rows(results)[("ftjax", "full")]
    assert full["flops_per_token"] == 6 * n + attention
    # XLA's own count of the compiled step is at least the model FLOPs' order.
    assert full["xla_flops_per_token"] > 0.5 * full["flops_per_token"]
    # LoRA skips the frozen weights' gradients: fewer model FLOPs than full.
    assert rows(results)[("ftjax", "lora")]["flops_per_token"] < full["flops_per_token"]


@pytest.mark.slow
def test_lora_trainable_count_is_closed_form(results):
    want = lora_trainable(results["model"], RANK)
    assert rows(results)[("ftjax", "lora")]["trainable"] == want
    if HAS_TORCH:  # PEFT's all-linear adapts the same matrices
        assert rows(results)[("torch", "lora")]["trainable"] == want
        assert (
            rows(results)[("torch", "full")]["trainable"]
            == rows(results)[("ftjax", "full")]["trainable"]
        )


@pytest.mark.slow
def test_ratios_and_profile_and_table(results):
    r = rows(results)
    assert r[("ftjax", "full")]["speedup_vs_full"] == pytest.approx(1.0)
    # A speed-up is the median over rounds of the per-round step-time ratio
    # (rounds are interleaved, so each ratio compares neighbours in time).
    full, lora = r[("ftjax", "full")], r[("ftjax", "lora")]
    assert lora["speedup_vs_full"] == pytest.approx(
        paired_median(lora["step_s_rounds"], full["step_s_rounds"])
    )
    if HAS_TORCH:
        assert full["speedup_vs_torch"] == pytest.approx(
            paired_median(full["step_s_rounds"], r[("torch", "full")]["step_s_rounds"])
        )
    profile = r[("ftjax", "full")]["profile"]
    assert profile["by_kind"].get("matmul", 0) > 0 and profile["top_ops"]
    table = bench.markdown(results)
    assert "| ftjax | lora |" in table and "| goal |" in table


def test_hlo_op_kinds():
    hlo = """HloModule m

%fused_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (p0: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  ROOT %add.1 = f32[4,4]{1,0} add(%p0, %p0)
}

ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %mm_fusion = f32[4,4]{1,0} fusion(%a, %a), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(train_step)/transpose(jvp(LlamaForCausalLM))/model/layers_3/mlp/down_proj/dot_general"}
  ROOT %loop_fusion = f32[4,4]{1,0} fusion(%mm_fusion), kind=kLoop, calls=%fused_add
}
"""
    ops = bench._hlo_ops(hlo)
    assert ops["mm_fusion"] == ("matmul", "bwd mlp/down_proj")
    assert ops["loop_fusion"] == ("elementwise", "loss, clipping, AdamW update")


def test_bad_preset_is_one_clear_error():
    with pytest.raises(ValueError, match=r"preset='7b'; expected one of tiny"):
        bench.BenchConfig(preset="7b").model_fields()


def test_every_registered_method_has_a_benchmark_config():
    """`--methods=all` must not stop at one method whose options the shared
    rank/alpha/targets settings break (OFT is sized by its block, not a rank)."""
    from ftjax import peft
    from ftjax.bench.config import method_config
    from ftjax.peft.registry import known_methods

    for name in known_methods():
        method = peft.build_method(method_config(name, rank=16, alpha=32))
        assert method.name == name


def test_peak_vs_full_divides_by_the_same_frameworks_full():
    from ftjax.bench.results import peak_vs_full

    rows = [
        {"framework": "ftjax", "method": "full", "rss_peak": 400},
        {"framework": "ftjax", "method": "lora", "rss_peak": 100},
        {"framework": "ftjax", "method": "lora", "variant": "scan", "rss_peak": 50},
        {"framework": "torch", "method": "full", "rss_peak": 800},
        {"framework": "torch", "method": "lora", "rss_peak": 200},
        {"framework": "tunix", "method": "lora", "rss_peak": 10},  # no full to compare with
    ]
    assert peak_vs_full(rows) == {
        ("ftjax", "full"): 1.0,
        ("ftjax", "lora"): 0.25,
        ("torch", "full"): 1.0,
        ("torch", "lora"): 0.25,
    }
