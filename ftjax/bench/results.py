"""From the jobs' rounds to the results: the summary per job (medians of
per-round ratios), the issue's goals, and the markdown tables."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess

from .config import BenchConfig


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


def peak_vs_full(mem_rows: list[dict], key: str = "rss_peak") -> dict[tuple[str, str], float]:
    """Each (framework, method)'s peak memory over its framework's full
    tuning's, from the memory rows (variants left out); what the docs' cost
    table and the LoRA memory goal read."""
    rows = [r for r in mem_rows if not r.get("variant") and r.get(key)]
    full = {r["framework"]: r[key] for r in rows if r["method"] == "full"}
    return {
        (r["framework"], r["method"]): r[key] / full[r["framework"]]
        for r in rows
        if r["framework"] in full
    }


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
    mem_ratio = peak_vs_full(mem_rows, "device_peak" if gpu else "rss_peak").get(("ftjax", "lora"))
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
            "| process base MB | peak RSS MB | peak above base MB | device peak MB | peak vs full |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        gpu = results["machine"].get("backend") not in (None, "cpu")
        ratios = peak_vs_full(results["memory"], "device_peak" if gpu else "rss_peak")
        for r in results["memory"]:
            ratio = None if r.get("variant") else ratios.get((r["framework"], r["method"]))
            if r.get("variant"):
                r = {**r, "method": f"{r['method']}@{r['variant']}"}
            sb = r.get("state_bytes") or {}
            above = r["rss_peak"] - r["rss_base"] if r.get("rss_peak") else None
            lines.append(
                f"| {r['framework']} | {r['method']} | {_mb(sb.get('trainable'))} / "
                f"{_mb(sb.get('frozen'))} / {_mb(sb.get('opt_state'))} | {_mb(r.get('rss_base'))} "
                f"| {_mb(r.get('rss_peak'))} | {_mb(above)} | {_mb(r.get('device_peak'))} "
                f"| {_f(ratio, '.2f', suffix='x')} |"
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
