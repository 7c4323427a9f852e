"""Aggregate a sweep's run directories into `report.md` and PNG plots.

Reads runs only through `ftjax.rundir.load_runs`; never imports a study
and never recomputes a metric: every number in the report is a summary value
a run stored (computed by `ftjax.eval`, see `ftjax.study.evaluate`),
aggregated over seeds by `aggregate_values`. Summary keys it understands:

  final/<set>/<metric>, base/<set>/<metric>   after / before fine-tuning
  forgetting/<set>/<metric>_drop|_increase    ftjax.eval.forgetting.metric_change
  analysis/energy_rank_90, analysis/intruders, analysis/relative_update_norm
  trainable_params, trainable_share, peak_rss_bytes, tokens_per_s, wall_time_s, lr

Runs that differ only in `train.seed` are one row, shown as mean ± std.

Example::

    report = build_report("runs/forgetting")   # markdown, rows, figures
    write_report("runs/forgetting")            # writes report.md and the PNGs,
                                               # returns "runs/forgetting/report.md"
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

from ftjax.errors import RunDirError
from ftjax.eval.forgetting import metric_change
from ftjax.rundir import load_runs, write_text_atomic

# Two-sided 95% quantiles of Student's t by degrees of freedom; beyond the
# table the next smaller entry (a slightly wider, conservative interval).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000,
        120: 1.980}  # fmt: skip


class Stat(NamedTuple):
    """A value aggregated over a group's runs (seeds)."""

    mean: float | None
    std: float | None  # sample standard deviation (n - 1); 0.0 for one value
    n: int
    ci95: float | None  # half-width of the 95% t-interval of the mean; None below 2 values

    def scaled(self, factor: float) -> Stat:
        if self.mean is None:
            return self
        ci = None if self.ci95 is None else self.ci95 * factor
        return Stat(self.mean * factor, self.std * factor, self.n, ci)


def aggregate_values(values) -> Stat:
    """Mean, sample std, count and 95% confidence half-width of the values
    that are numbers (None and NaN are left out): the one aggregation behind
    every number of the report.

    >>> aggregate_values([1.0, 3.0, None, float("nan")])  # doctest: +ELLIPSIS
    Stat(mean=2.0, std=1.4142135623730951, n=2, ci95=12.706...)
    """
    xs = [
        float(v)
        for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
    ]
    if not xs:
        return Stat(None, None, 0, None)
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Stat(mean, 0.0, 1, None)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    t = _T95[max(k for k in _T95 if k <= n - 1)]
    return Stat(mean, std, n, t * std / math.sqrt(n))


def method_label(summary: dict) -> str:
    """The run's method as the registry names it (`lora r=16 all-linear`)."""
    from ftjax.peft import registry

    return registry.label(summary.get("method", {}))


def group_key(run: dict) -> str:
    """Runs that differ only by seed share a key."""
    label = run["summary"].get("label") or method_label(run["summary"])
    return f"{label} lr={run['summary'].get('lr')}" + (
        f" {run['summary']['variant']}" if run["summary"].get("variant") else ""
    )


def format_stat(stat: Stat, pct: bool = False, digits: int = 3) -> str:
    """ "mean ± std" (std only over several runs); percentages with one decimal."""
    if stat.mean is None:
        return "–"
    if pct:
        s = f"{stat.mean * 100:.1f}"
        return s + (f" ± {stat.std * 100:.1f}" if stat.n > 1 else "")
    s = f"{stat.mean:.{digits}g}"
    return s + (f" ± {stat.std:.{digits}g}" if stat.n > 1 else "")


def forgetting_key(general: str, metric: str) -> str:
    """The summary key of forgetting on `general` in `metric`, named as
    `ftjax.eval.forgetting.metric_change` names it (`..._drop` / `..._increase`)."""
    change = metric_change(metric, 0.0, 0.0)
    return f"forgetting/{general}/{change[0] if change else metric + '_drop'}"


def aggregate(runs: list[dict], target: str, general: str, metric: str) -> list[dict]:
    """One row per group of runs (`group_key`), each value a `Stat`; sorted by
    trainable parameters, most first."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(group_key(r), []).append(r)
    rows = []
    for key, members in groups.items():
        s = [m["summary"] for m in members]
        get = lambda k, s=s: aggregate_values([x.get(k) for x in s])
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
                "forgetting": get(forgetting_key(general, metric)),
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
    rows.sort(key=lambda r: -(r["trainable"].mean or 0))
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
# Each returns its matplotlib Figure (object-oriented API: no pyplot state, no
# display backend), or None when there is nothing to plot; the caller saves it.


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def plot_learning_vs_forgetting(rows, metric):
    """Target score against forgetting, one point per row (percent); the
    Pareto front as stars joined by a dashed line."""
    pts = [(r["target"].mean, r["forgetting"].mean) for r in rows]
    ok = [i for i, p in enumerate(pts) if None not in p]
    front = {ok[i] for i in pareto_front([pts[i] for i in ok])}
    fig = _figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for i in ok:
        r = rows[i]
        ax.errorbar(
            pts[i][0] * 100,
            pts[i][1] * 100,
            xerr=(r["target"].std or 0) * 100,
            yerr=(r["forgetting"].std or 0) * 100,
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
    return fig


def plot_curves(rows):
    """Training loss against step, the first run of each row."""
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
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
    return fig


def plot_target_vs_params(rows, metric):
    """Target score (percent) against trainable parameters, log scale."""
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    for r in rows:
        if r["trainable"].mean and r["target"].mean is not None:
            ax.errorbar(
                r["trainable"].mean,
                r["target"].mean * 100,
                yerr=(r["target"].std or 0) * 100,
                fmt="o",
                label=r["label"],
            )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"target {metric} (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_weight_analysis(rows):
    """ΔW's rank at 90% energy and intruder dimensions per row, as bars."""
    have = [r for r in rows if r["energy_rank"].mean is not None]
    if not have:
        return None
    fig = _figure(figsize=(9, 3.8))
    axes = fig.subplots(1, 2)
    labels = [r["label"] for r in have]
    axes[0].bar(labels, [r["energy_rank"].mean for r in have])
    axes[0].set_title("rank of ΔW at 90% energy (mean)")
    axes[1].bar(labels, [r["intruders"].mean or 0 for r in have])
    axes[1].set_title("intruder dimensions (mean per matrix)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- text


def findings(rows, metric) -> list[str]:
    """Sentences computed from the table; nothing here is hard-coded."""
    ok = [r for r in rows if r["target"].mean is not None and r["forgetting"].mean is not None]
    if not ok:
        return ["No run has both a target and a forgetting measurement yet."]
    out = []
    best_learn = max(ok, key=lambda r: r["target"].mean)
    least_forget = min(ok, key=lambda r: r["forgetting"].mean)
    out.append(
        f"Highest target {metric}: **{best_learn['label']}** "
        f"({best_learn['target'].mean * 100:.1f}%), forgetting "
        f"{best_learn['forgetting'].mean * 100:.1f} points."
    )
    out.append(
        f"Least forgetting: **{least_forget['label']}** "
        f"({least_forget['forgetting'].mean * 100:.1f} points), target {metric} "
        f"{least_forget['target'].mean * 100:.1f}%."
    )
    # The reference is plain full fine-tuning at its best target score, within
    # the same variant (e.g. the same label-noise rate) as the rows compared.
    variants = sorted({r["members"][0]["summary"].get("variant", "") for r in ok})
    full = []
    for variant in variants:
        same = [r for r in ok if r["members"][0]["summary"].get("variant", "") == variant]
        ref = sorted(
            (r for r in same if r["method"].get("name") == "full" and "replay" not in r["label"]),
            key=lambda r: -r["target"].mean,
        )
        peft_rows = [r for r in same if r["method"].get("name") != "full"]
        if not ref or not peft_rows:
            continue
        full.append(ref[0])
        f = ref[0]
        learned_less = sum(r["target"].mean < f["target"].mean for r in peft_rows)
        forgot_less = sum(r["forgetting"].mean < f["forgetting"].mean for r in peft_rows)
        where = f" ({variant})" if variant else ""
        out.append(
            f"Against full fine-tuning{where}, {learned_less} of {len(peft_rows)} PEFT "
            f"configurations learned less on the target and {forgot_less} of {len(peft_rows)} "
            "forgot less."
        )
    front = pareto_front([(r["target"].mean, r["forgetting"].mean) for r in ok])
    out.append(
        "Pareto front (learning vs forgetting): " + ", ".join(ok[i]["label"] for i in front) + "."
    )
    mem = [r for r in ok if r["state_memory"].mean]
    if full and len(mem) > 1 and full[0]["state_memory"].mean:
        lo = min(mem, key=lambda r: r["state_memory"].mean)
        ratio = lo["state_memory"].mean / full[0]["state_memory"].mean
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


def _results_table(rows) -> list[str]:
    header = (
        "| method | seeds | trainable params | share | target | general before | general after "
        "| forgetting | general loss Δ | train state (MB) | peak RSS (MB) | tokens/s | wall (s) | lr |"
    )
    lines = [header, "|" + "---|" * 14]
    for r in rows:
        cells = [
            r["label"],
            str(r["seeds"]),
            f"{int(r['trainable'].mean):,}" if r["trainable"].mean else "–",
            f"{r['share'].mean * 100:.3g}%" if r["share"].mean is not None else "–",
            format_stat(r["target"], pct=True),
            format_stat(r["general_before"], pct=True),
            format_stat(r["general_after"], pct=True),
            format_stat(r["forgetting"], pct=True),
            format_stat(r["general_loss_increase"]),
            format_stat(r["state_memory"].scaled(2**-20)) if r["state_memory"].mean else "–",
            format_stat(r["memory"].scaled(2**-20)) if r["memory"].mean else "–",
            format_stat(r["tokens_per_s"], digits=4),
            format_stat(r["wall"]),
            f"{r['lr']:g}" if r["lr"] else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


@dataclasses.dataclass
class Report:
    markdown: str
    rows: list[dict]  # `aggregate`'s rows
    figures: dict  # PNG file name -> matplotlib Figure


def build_report(
    sweep_dir: str, target: str = "target", general: str = "general", metric: str = "exact_match"
) -> Report:
    """The report of a sweep directory's completed runs, not yet written."""
    runs = load_runs(sweep_dir)
    if not runs:
        raise RunDirError(f"{sweep_dir}: no completed runs (summary.json) to report on")
    rows = aggregate(runs, target, general, metric)
    lines = [f"# Report: {os.path.basename(os.path.abspath(sweep_dir))}", ""]
    lines.append(
        f"{len(runs)} runs in {len(rows)} configurations. Target set `{target}`, general set "
        f"`{general}`, metric `{metric}` (mean ± std over seeds where there are several)."
    )
    lines += ["", "## Results", ""] + _results_table(rows)
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
        empty = Stat(None, None, 0, None)
        for r in rows:
            cells = [format_stat(r["extra"].get(k, empty), pct=True) for k in extra_keys]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        lines += [""]
    figures = {
        "learning_vs_forgetting.png": plot_learning_vs_forgetting(rows, metric),
        "training_curves.png": plot_curves(rows),
        "target_vs_params.png": plot_target_vs_params(rows, metric),
    }
    lines += ["## Plots", "", "![learning vs forgetting](learning_vs_forgetting.png)", ""]
    lines += ["![training curves](training_curves.png)", ""]
    lines += ["![target vs trainable parameters](target_vs_params.png)", ""]
    weights = plot_weight_analysis(rows)
    if weights is not None:
        figures["weight_analysis.png"] = weights
        lines += ["## What fine-tuning did to the weights", ""]
        lines += [
            "| method | ΔW rank @90% energy | intruder dims | ‖ΔW‖/‖W‖ |",
            "|---|---|---|---|",
        ]
        for r in rows:
            if r["energy_rank"].mean is not None:
                lines.append(
                    f"| {r['label']} | {format_stat(r['energy_rank'])} | "
                    f"{format_stat(r['intruders'])} | {format_stat(r['update_norm'])} |"
                )
        lines += ["", "![weight analysis](weight_analysis.png)", ""]
    return Report("\n".join(lines), rows, figures)


def write_report(
    sweep_dir: str, target: str = "target", general: str = "general", metric: str = "exact_match"
) -> str:
    """Writes <sweep_dir>/report.md and its plots; returns the markdown path."""
    report = build_report(sweep_dir, target, general, metric)
    for name, fig in report.figures.items():
        try:
            fig.savefig(os.path.join(sweep_dir, name), dpi=110)
        except OSError as e:
            where = os.path.join(sweep_dir, name)
            raise RunDirError(f"{where}: cannot write it ({e.strerror or e})") from None
    path = os.path.join(sweep_dir, "report.md")
    write_text_atomic(path, report.markdown)
    return path
