"""Aggregate run directories into `report.md` and PNG plots.

Reads only files runs write (`config.json`, `summary.json`, `metrics.jsonl`);
never imports a study. Summary keys it understands:

  final/<set>/<metric>, base/<set>/<metric>   after / before fine-tuning
  forgetting/<set>/<metric>_drop              base minus final (accuracy-like)
  analysis/energy_rank_90, analysis/intruders, analysis/relative_update_norm
  trainable_params, trainable_share, peak_rss_bytes, tokens_per_s, wall_time_s, lr

Runs that differ only in `train.seed` are one row, shown as mean ± std.
"""

from __future__ import annotations

import json
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_runs(workdir: str) -> list[dict]:
    runs = []
    for name in sorted(os.listdir(workdir)):
        run_dir = os.path.join(workdir, name)
        summary_path = os.path.join(run_dir, "summary.json")
        if not os.path.isfile(summary_path):
            continue
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("status") != "completed" or summary.get("role") == "prerequisite":
            continue
        config = {}
        if os.path.isfile(os.path.join(run_dir, "config.json")):
            with open(os.path.join(run_dir, "config.json")) as f:
                config = json.load(f)
        curve = []
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                curve = [json.loads(line) for line in f if line.strip()]
        runs.append(
            {"name": name, "dir": run_dir, "summary": summary, "config": config, "curve": curve}
        )
    return runs


def method_label(summary: dict) -> str:
    m = summary.get("method", {})
    name = m.get("name", "?")
    parts = [name]
    if "rank" in m and name not in ("full", "bitfit", "freeze"):
        parts.append(f"r={m['rank']}")
    if m.get("targets") and name not in ("full", "bitfit", "freeze"):
        parts.append(str(m["targets"]))
    if m.get("init") not in (None, "kaiming"):
        parts.append(f"init={m['init']}")
    if m.get("rslora"):
        parts.append("rslora")
    if name == "freeze":
        parts.append(
            f"last {m['last_layers']}" if m.get("last_layers") else str(m.get("trainable"))
        )
    return " ".join(parts)


def group_key(run: dict) -> str:
    """Runs that differ only by seed share a key."""
    label = run["summary"].get("label") or method_label(run["summary"])
    return f"{label} lr={run['summary'].get('lr')}" + (
        f" {run['summary']['variant']}" if run["summary"].get("variant") else ""
    )


def _stats(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None, 0
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std, len(values)


def _fmt(mean, std, n, pct=False, digits=3):
    if mean is None:
        return "–"
    scale = 100.0 if pct else 1.0
    s = f"{mean * scale:.{digits}g}" if not pct else f"{mean * scale:.1f}"
    if n > 1:
        s += f" ± {std * scale:.{digits}g}" if not pct else f" ± {std * scale:.1f}"
    return s


def aggregate(runs: list[dict], target: str, general: str, metric: str) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(group_key(r), []).append(r)
    rows = []
    for key, members in groups.items():
        s = [m["summary"] for m in members]
        get = lambda k, s=s: _stats([x.get(k) for x in s])
        rows.append(
            {
                "key": key,
                "label": s[0].get("label") or method_label(s[0]),
                "method": s[0].get("method", {}),
                "seeds": len(members),
                "trainable": get("trainable_params"),
                "share": get("trainable_share"),
                "target": get(f"final/{target}/{metric}"),
                "target_base": get(f"base/{target}/{metric}"),
                "general_before": get(f"base/{general}/{metric}"),
                "general_after": get(f"final/{general}/{metric}"),
                "forgetting": get(f"forgetting/{general}/{metric}_drop"),
                "target_loss": get(f"final/{target}/loss"),
                "general_loss_increase": get(f"forgetting/{general}/loss_increase"),
                "memory": get("peak_rss_bytes"),
                "state_memory": get("train_state_bytes"),
                "tokens_per_s": get("tokens_per_s"),
                "wall": get("wall_time_s"),
                "lr": s[0].get("lr"),
                "energy_rank": get("analysis/energy_rank_90"),
                "intruders": get("analysis/intruders"),
                "update_norm": get("analysis/relative_update_norm"),
                "extra": {k: get(k) for k in s[0] if k.startswith("extra/")},
                "members": members,
            }
        )
    rows.sort(key=lambda r: -(r["trainable"][0] or 0))
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (higher learning, lower forgetting)."""
    front = []
    for i, (learn, forget) in enumerate(points):
        dominated = any(
            (l2 >= learn and f2 <= forget) and (l2 > learn or f2 < forget)
            for j, (l2, f2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


# ----------------------------------------------------------------------------- plots


def plot_learning_vs_forgetting(rows, path, metric):
    pts = [(r["target"][0], r["forgetting"][0]) for r in rows]
    ok = [i for i, p in enumerate(pts) if None not in p]
    front = {ok[i] for i in pareto_front([pts[i] for i in ok])}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i in ok:
        r = rows[i]
        ax.errorbar(
            pts[i][0] * 100,
            pts[i][1] * 100,
            xerr=(r["target"][1] or 0) * 100,
            yerr=(r["forgetting"][1] or 0) * 100,
            fmt="*" if i in front else "o",
            ms=12 if i in front else 7,
            label=r["label"],
        )
    if front:
        fp = sorted(pts[i] for i in front)
        ax.plot(
            [p[0] * 100 for p in fp], [p[1] * 100 for p in fp], "k--", lw=1, label="Pareto front"
        )
    ax.set_xlabel(f"target {metric} after fine-tuning (%)")
    ax.set_ylabel(f"forgetting: drop in general {metric} (points)")
    ax.set_title("Learning vs forgetting (stars: Pareto front)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(rows, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        run = r["members"][0]
        pts = [(c["step"], c["loss"]) for c in run["curve"] if "loss" in c]
        if pts:
            ax.plot(*zip(*pts), label=r["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.set_title("Training curves (first seed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_target_vs_params(rows, path, metric):
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["trainable"][0] and r["target"][0] is not None:
            ax.errorbar(
                r["trainable"][0],
                r["target"][0] * 100,
                yerr=(r["target"][1] or 0) * 100,
                fmt="o",
                label=r["label"],
            )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"target {metric} (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weight_analysis(rows, path):
    have = [r for r in rows if r["energy_rank"][0] is not None]
    if not have:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    labels = [r["label"] for r in have]
    axes[0].bar(labels, [r["energy_rank"][0] for r in have])
    axes[0].set_title("rank of ΔW at 90% energy (mean)")
    axes[1].bar(labels, [r["intruders"][0] or 0 for r in have])
    axes[1].set_title("intruder dimensions (mean per matrix)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- text


def findings(rows, metric) -> list[str]:
    """Sentences computed from the table; nothing here is hard-coded."""
    ok = [r for r in rows if r["target"][0] is not None and r["forgetting"][0] is not None]
    if not ok:
        return ["No run has both a target and a forgetting measurement yet."]
    out = []
    best_learn = max(ok, key=lambda r: r["target"][0])
    least_forget = min(ok, key=lambda r: r["forgetting"][0])
    out.append(
        f"Highest target {metric}: **{best_learn['label']}** "
        f"({best_learn['target'][0] * 100:.1f}%), forgetting "
        f"{best_learn['forgetting'][0] * 100:.1f} points."
    )
    out.append(
        f"Least forgetting: **{least_forget['label']}** "
        f"({least_forget['forgetting'][0] * 100:.1f} points), target {metric} "
        f"{least_forget['target'][0] * 100:.1f}%."
    )
    # The reference is plain full fine-tuning at its best target score, within
    # the same variant (e.g. the same label-noise rate) as the rows compared.
    variants = sorted({r["members"][0]["summary"].get("variant", "") for r in ok})
    full = []
    for variant in variants:
        same = [r for r in ok if r["members"][0]["summary"].get("variant", "") == variant]
        ref = sorted(
            (r for r in same if r["method"].get("name") == "full" and "replay" not in r["label"]),
            key=lambda r: -r["target"][0],
        )
        peft_rows = [r for r in same if r["method"].get("name") != "full"]
        if not ref or not peft_rows:
            continue
        full.append(ref[0])
        f = ref[0]
        learned_less = sum(r["target"][0] < f["target"][0] for r in peft_rows)
        forgot_less = sum(r["forgetting"][0] < f["forgetting"][0] for r in peft_rows)
        where = f" ({variant})" if variant else ""
        out.append(
            f"Against full fine-tuning{where}, {learned_less} of {len(peft_rows)} PEFT "
            f"configurations learned less on the target and {forgot_less} of {len(peft_rows)} "
            "forgot less."
        )
    front = pareto_front([(r["target"][0], r["forgetting"][0]) for r in ok])
    out.append(
        "Pareto front (learning vs forgetting): " + ", ".join(ok[i]["label"] for i in front) + "."
    )
    mem = [r for r in ok if r["state_memory"][0]]
    if full and len(mem) > 1 and full[0]["state_memory"][0]:
        lo = min(mem, key=lambda r: r["state_memory"][0])
        ratio = lo["state_memory"][0] / full[0]["state_memory"][0]
        out.append(
            f"Smallest training state (weights + gradients + optimizer state): {lo['label']} at "
            f"{ratio:.2f}× full fine-tuning's."
        )
    return out


def _sharing_note(runs: list[dict]) -> list[str]:
    """Runs a sweep ran side by side (`--jobs`) timed themselves on a share
    of the machine: their tokens/s and wall times are not single-run speeds."""
    shared = [r["summary"] for r in runs if (r["summary"].get("concurrent_runs") or 1) > 1]
    if not shared:
        return []
    jobs = max(r["concurrent_runs"] for r in shared)
    cores = sorted({r.get("cpu_cores") for r in shared if r.get("cpu_cores")})
    on = f", each on {'/'.join(map(str, cores))} CPU core(s)" if cores else ""
    return [
        f"{len(shared)} of {len(runs)} runs ran {jobs} at a time{on}: their tokens/s and wall "
        "times are speeds under that sharing, comparable with each other, not with a run alone.",
        "",
    ]


def write_report(
    workdir: str, target: str = "target", general: str = "general", metric: str = "exact_match"
) -> str:
    """Writes <workdir>/report.md and plots; returns the markdown path."""
    runs = load_runs(workdir)
    if not runs:
        raise FileNotFoundError(f"{workdir}: no completed runs (summary.json) to report on")
    rows = aggregate(runs, target, general, metric)
    lines = [f"# Report: {os.path.basename(os.path.abspath(workdir))}", ""]
    lines.append(
        f"{len(runs)} runs in {len(rows)} configurations. Target set `{target}`, general set "
        f"`{general}`, metric `{metric}` (mean ± std over seeds where there are several)."
    )
    lines += ["", "## Results", ""]
    header = (
        "| method | seeds | trainable params | share | target | general before | general after "
        "| forgetting | general loss Δ | train state (MB) | peak RSS (MB) | tokens/s | wall (s) | lr |"
    )
    lines += [header, "|" + "---|" * 14]
    for r in rows:
        mem = r["memory"]
        state = r["state_memory"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    str(r["seeds"]),
                    f"{int(r['trainable'][0]):,}" if r["trainable"][0] else "–",
                    f"{r['share'][0] * 100:.3g}%" if r["share"][0] is not None else "–",
                    _fmt(*r["target"], pct=True),
                    _fmt(*r["general_before"], pct=True),
                    _fmt(*r["general_after"], pct=True),
                    _fmt(*r["forgetting"], pct=True),
                    _fmt(*r["general_loss_increase"]),
                    _fmt(state[0] / 2**20 if state[0] else None, (state[1] or 0) / 2**20, state[2]),
                    _fmt(mem[0] / 2**20 if mem[0] else None, (mem[1] or 0) / 2**20, mem[2]),
                    _fmt(*r["tokens_per_s"], digits=4),
                    _fmt(*r["wall"]),
                    f"{r['lr']:g}" if r["lr"] else "–",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Target, general and forgetting are percentages (forgetting in points). Train state is "
        "weights + gradients + optimizer state; peak RSS is the run's process peak (at toy sizes "
        "the runtime dominates it).",
        "",
    ]
    lines += _sharing_note(runs)
    lines += ["## Findings", ""] + [f"- {s}" for s in findings(rows, metric)] + [""]
    extra_keys = sorted({k for r in rows for k in r["extra"]})
    if extra_keys:
        lines += ["## Further measurements", ""]
        lines += ["| method | " + " | ".join(k[6:] for k in extra_keys) + " |"]
        lines += ["|" + "---|" * (len(extra_keys) + 1)]
        for r in rows:
            cells = [_fmt(*r["extra"].get(k, (None, None, 0)), pct=True) for k in extra_keys]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        lines += [""]
    plot_learning_vs_forgetting(rows, os.path.join(workdir, "learning_vs_forgetting.png"), metric)
    plot_curves(rows, os.path.join(workdir, "training_curves.png"))
    plot_target_vs_params(rows, os.path.join(workdir, "target_vs_params.png"), metric)
    lines += ["## Plots", "", "![learning vs forgetting](learning_vs_forgetting.png)", ""]
    lines += ["![training curves](training_curves.png)", ""]
    lines += ["![target vs trainable parameters](target_vs_params.png)", ""]
    if plot_weight_analysis(rows, os.path.join(workdir, "weight_analysis.png")):
        lines += ["## What fine-tuning did to the weights", ""]
        lines += [
            "| method | ΔW rank @90% energy | intruder dims | ‖ΔW‖/‖W‖ |",
            "|---|---|---|---|",
        ]
        for r in rows:
            if r["energy_rank"][0] is not None:
                lines.append(
                    f"| {r['label']} | {_fmt(*r['energy_rank'])} | {_fmt(*r['intruders'])} "
                    f"| {_fmt(*r['update_norm'])} |"
                )
        lines += ["", "![weight analysis](weight_analysis.png)", ""]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
