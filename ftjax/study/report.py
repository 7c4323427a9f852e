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
import os

from ftjax.errors import RunDirError
from ftjax.eval.forgetting import metric_change
from ftjax.rundir import load_runs, write_text_atomic
from ftjax.study.selection import read_selection
from ftjax.study.stats import Stat, aggregate_values, difference, matched_forgetting

__all__ = ["Report", "Stat", "aggregate", "aggregate_values", "build_report", "write_report"]


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
    """ "mean ± h", h the half-width of the 95% confidence interval over seeds
    (only where there are several); percentages with one decimal."""
    if stat.mean is None:
        return "–"
    half = stat.ci95 if stat.n > 1 and stat.ci95 is not None else None
    if pct:
        s = f"{stat.mean * 100:.1f}"
        return s + (f" ± {half * 100:.1f}" if half is not None else "")
    s = f"{stat.mean:.{digits}g}"
    return s + (f" ± {half:.{digits}g}" if half is not None else "")


def forgetting_key(general: str, metric: str) -> str:
    """The summary key of forgetting on `general` in `metric`, named as
    `ftjax.eval.forgetting.metric_change` names it (`..._drop` / `..._increase`)."""
    change = metric_change(metric, 0.0, 0.0)
    return f"forgetting/{general}/{change[0] if change else metric + '_drop'}"


CURVE = "curve/{}/exact_match"


def curve_points(run: dict, target: str, general: str) -> list[tuple[int, float, float]]:
    """(step, target, general) exact match along one run's training (its
    `curve/<set>/exact_match` records; a step logged twice counts once, the
    last time)."""
    by_step = {}
    for rec in run.get("curve", []):
        t, g = rec.get(CURVE.format(target)), rec.get(CURVE.format(general))
        if t is not None and g is not None:
            by_step[int(rec["step"])] = (float(t), float(g))
    return [(step, *by_step[step]) for step in sorted(by_step)]


def aggregate(
    runs: list[dict], target: str, general: str, metric: str, groups: dict | None = None
) -> list[dict]:
    """One row per group of runs, each value a `Stat`; sorted by trainable
    parameters, most first. `groups` ({label: [run names]}, a study's
    selection) fixes the groups; otherwise runs that differ only by seed
    share a row (`group_key`)."""
    if groups is None:
        grouped: dict[str, list[dict]] = {}
        for r in runs:
            grouped.setdefault(group_key(r), []).append(r)
    else:
        by_name = {r["name"]: r for r in runs}
        grouped = {
            label: [by_name[n] for n in names if n in by_name] for label, names in groups.items()
        }
        grouped = {k: v for k, v in grouped.items() if v}
    rows = []
    for key, members in grouped.items():
        s = [m["summary"] for m in members]
        get = lambda k, s=s: aggregate_values([x.get(k) for x in s])
        label = key if groups is not None else (s[0].get("label") or method_label(s[0]))
        rows.append(
            {
                "key": key,
                "label": label,
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
                "curves": [curve_points(m, target, general) for m in members],
                "members": members,
            }
        )
    rows.sort(key=lambda r: -(r["trainable"].mean or 0))
    return rows


def values_of(row: dict, key: str) -> list:
    """One summary value per seed of a row (what `difference` compares)."""
    return [m["summary"].get(key) for m in row["members"]]


def matched_learning(row: dict, level: float) -> dict:
    """Forgetting at matched learning for one row: over its seeds, the drop
    in general exact match (from the curve's step 0) at the first evaluation
    where target exact match reaches `level`; with how many seeds reached it."""
    drops, steps = [], []
    for points in row["curves"]:
        if not points or points[0][0] != 0:
            continue
        hit = matched_forgetting(points, level, general_base=points[0][2])
        if hit is not None:
            steps.append(hit[0])
            drops.append(hit[1])
    reached = len(drops)
    total = sum(1 for p in row["curves"] if p and p[0][0] == 0)
    return {"drop": aggregate_values(drops), "step": aggregate_values(steps), "reached": reached,
            "of": total}  # fmt: skip


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


MARKERS = "osD^vP*Xh<>pd"


def row_style(i: int) -> dict:
    """Row i's colour and marker, the same in every plot: 20 distinct colours
    (tab20, dark shades first) and a marker cycle of another length, so no two
    of the first 20 rows look alike."""
    from matplotlib import colormaps

    colours = colormaps["tab20"].colors
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {"color": colours[order[i % 20]], "marker": MARKERS[i % len(MARKERS)]}


def _half(stat: Stat, factor: float = 100.0) -> float:
    return (stat.ci95 or 0.0) * factor if stat.n > 1 else 0.0


def plot_learning_vs_forgetting(rows, metric):
    """Target score against forgetting, one point per row (percent, bars:
    95% CI over seeds); the Pareto front ringed and joined by a dashed line."""
    pts = [(r["target"].mean, r["forgetting"].mean) for r in rows]
    ok = [i for i, p in enumerate(pts) if None not in p]
    front = {ok[i] for i in pareto_front([pts[i] for i in ok])}
    fig = _figure(figsize=(7, 5))
    ax = fig.subplots()
    for i in ok:
        r = rows[i]
        st = row_style(i)
        ax.errorbar(
            pts[i][0] * 100,
            pts[i][1] * 100,
            xerr=_half(r["target"]),
            yerr=_half(r["forgetting"]),
            fmt=st["marker"],
            color=st["color"],
            ms=8,
            capsize=3,
            label=r["label"],
        )
        if i in front:
            ax.plot(pts[i][0] * 100, pts[i][1] * 100, "o", ms=16, mfc="none", mec="k")
    if front:
        fp = sorted(pts[i] for i in front)
        ax.plot(
            [p[0] * 100 for p in fp], [p[1] * 100 for p in fp], "k--", lw=1, label="Pareto front"
        )
    ax.set_xlabel(f"target {metric} after fine-tuning (%)")
    ax.set_ylabel(f"forgetting: drop in general {metric} (points)")
    ax.set_title("Learning vs forgetting (ringed: Pareto front; bars: 95% CI over seeds)",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _curve_stats(curves):
    """Per step present in every seed's curve: (step, Stat of target, Stat of general)."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    common = set.intersection(*({p[0] for p in c} for c in curves))
    out = []
    for step in sorted(common):
        at = [next(p for p in c if p[0] == step) for c in curves]
        out.append((step, aggregate_values([p[1] for p in at]),
                    aggregate_values([p[2] for p in at])))  # fmt: skip
    return out


def plot_learning_forgetting_curves(rows, metric):
    """Along training, mean over seeds: target score against step, general
    score against step (bands: 95% CI over seeds), and general against target
    (the learning-forgetting curve: up and to the right is better)."""
    have = [(i, r, _curve_stats(r["curves"])) for i, r in enumerate(rows)]
    have = [h for h in have if h[2]]
    if not have:
        return None
    fig = _figure(figsize=(15, 4.8))
    ax_t, ax_g, ax_tg = fig.subplots(1, 3)
    for i, r, stats in have:
        st = row_style(i)
        steps = [x[0] for x in stats]
        for ax, k in ((ax_t, 1), (ax_g, 2)):
            mean = [x[k].mean * 100 for x in stats]
            half = [_half(x[k]) for x in stats]
            ax.plot(steps, mean, marker=st["marker"], color=st["color"], ms=4, label=r["label"])
            ax.fill_between(steps, [m - h for m, h in zip(mean, half)],
                            [m + h for m, h in zip(mean, half)], color=st["color"],
                            alpha=0.15, lw=0)  # fmt: skip
        ax_tg.plot([x[1].mean * 100 for x in stats], [x[2].mean * 100 for x in stats],
                   marker=st["marker"], color=st["color"], ms=4, label=r["label"])  # fmt: skip
    ax_t.set(xlabel="step", ylabel=f"target {metric} (%)", title="Learning (band: 95% CI)")
    ax_g.set(xlabel="step", ylabel=f"general {metric} (%)", title="Forgetting (band: 95% CI)")
    ax_tg.set(xlabel=f"target {metric} (%)", ylabel=f"general {metric} (%)",
              title="General against target along training (mean over seeds)")  # fmt: skip
    for ax in (ax_t, ax_g, ax_tg):
        ax.title.set_fontsize(9)
    ax_tg.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(rows):
    """Training loss against step, the first run of each row."""
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, r in enumerate(rows):
        run = r["members"][0]
        pts = [(c["step"], c["loss"]) for c in run["curve"] if "loss" in c]
        if pts:
            ax.plot(*zip(*pts), label=r["label"], color=row_style(i)["color"])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.set_title("Training curves (first seed)")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_target_vs_params(rows, metric):
    """Target score (percent) against trainable parameters, log scale (bars:
    95% CI over seeds)."""
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, r in enumerate(rows):
        if r["trainable"].mean and r["target"].mean is not None:
            st = row_style(i)
            ax.errorbar(
                r["trainable"].mean,
                r["target"].mean * 100,
                yerr=_half(r["target"]),
                fmt=st["marker"],
                color=st["color"],
                capsize=3,
                label=r["label"],
            )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"target {metric} (%)")
    ax.set_title("bars: 95% CI over seeds", fontsize=9)
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


def findings(rows, metric, target: str = "target", general: str = "general") -> list[str]:
    """Sentences computed from the table; nothing here is hard-coded."""
    ok = [r for r in rows if r["target"].mean is not None and r["forgetting"].mean is not None]
    if not ok:
        return ["No run has both a target and a forgetting measurement yet."]
    out = []
    tkey, fkey = f"final/{target}/{metric}", forgetting_key(general, metric)
    by_learning = sorted(ok, key=lambda r: -r["target"].mean)
    by_forgetting = sorted(ok, key=lambda r: r["forgetting"].mean)
    best_learn, least_forget = by_learning[0], by_forgetting[0]
    out.append(
        f"Highest mean target {metric}: **{best_learn['label']}** "
        f"({best_learn['target'].mean * 100:.1f}%), forgetting "
        f"{best_learn['forgetting'].mean * 100:.1f} points" + _lead(by_learning, tkey) + "."
    )
    out.append(
        f"Least mean forgetting: **{least_forget['label']}** "
        f"({least_forget['forgetting'].mean * 100:.1f} points), target {metric} "
        f"{least_forget['target'].mean * 100:.1f}%" + _lead(by_forgetting, fkey) + "."
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
        learned = [difference(values_of(r, tkey), values_of(f, tkey)) for r in peft_rows]
        forgot = [difference(values_of(r, fkey), values_of(f, fkey)) for r in peft_rows]
        learned_less = sum(d.resolved is True and d.diff < 0 for d in learned)
        forgot_less = sum(d.resolved is True and d.diff < 0 for d in forgot)
        where = f" ({variant})" if variant else ""
        out.append(
            f"Against full fine-tuning{where}, {learned_less} of {len(peft_rows)} PEFT "
            f"configurations learned less on the target and {forgot_less} of {len(peft_rows)} "
            "forgot less, counting only differences whose 95% interval (Welch, over seeds) "
            "excludes zero."
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


def _lead(ranked: list[dict], key: str) -> str:
    """Whether the first row's lead over the second is resolved at 95%."""
    if len(ranked) < 2:
        return ""
    d = difference(values_of(ranked[0], key), values_of(ranked[1], key))
    if d.resolved is None:
        return f"; its lead over {ranked[1]['label']} is untested (one seed)"
    verdict = "resolved" if d.resolved else "not resolved"
    return (
        f"; its lead over {ranked[1]['label']} ({abs(d.diff) * 100:.1f} ± {d.ci95 * 100:.1f} "
        f"points) is {verdict} at 95%"
    )


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


MATCHED_LEVELS = (0.5, 0.9)  # of full fine-tuning's final target score


def _reference_full(rows):
    """Plain full fine-tuning's row (the matched-learning reference), or None."""
    full = [r for r in rows if r["method"].get("name") == "full" and "replay" not in r["label"]]
    full = [r for r in full if r["target"].mean is not None]
    return max(full, key=lambda r: r["target"].mean) if full else None


def _matched_section(rows, metric) -> list[str]:
    """Forgetting at matched learning: each row's general drop at the first
    evaluation where its target score reaches 50% / 90% of full fine-tuning's
    final score (from the curves recorded along training)."""
    ref = _reference_full(rows)
    if ref is None or not any(any(c) for r in rows for c in r["curves"]):
        return []
    if not ref["target"].mean:
        return ["## Forgetting at matched learning", "",
                f"Full fine-tuning learned none of the target ({metric} 0): no level to match.",
                ""]  # fmt: skip
    levels = [(f, f * ref["target"].mean) for f in MATCHED_LEVELS]
    head = (
        "| method | "
        + " | ".join(f"drop at {f:.0%} of full ({lv * 100:.0f}% target) | step" for f, lv in levels)
        + " |"
    )
    lines = ["## Forgetting at matched learning", "",
             f"General {metric} drop (points, from the curve's step 0) at the first evaluation "
             "where the target score reaches the level; `k/n`: seeds that reached it (the mean "
             "and interval are over those).", "", head, "|" + "---|" * (1 + 2 * len(levels))]  # fmt: skip
    for r in rows:
        cells = [r["label"]]
        for _, level in levels:
            m = matched_learning(r, level)
            if not m["reached"]:
                cells += [f"not reached (0/{m['of']})", "–"]
            else:
                cells += [f"{format_stat(m['drop'], pct=True)} ({m['reached']}/{m['of']})",
                          format_stat(m["step"], digits=3)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _selection_section(selection, runs, target, general, metric) -> list[str]:
    """Each row's grid, its validation scores and the choice; and whether the
    chosen point collapsed (no target learned and the general score lost),
    with whether every grid point did."""
    rule = selection["rule"]
    by_name = {r["name"]: r["summary"] for r in runs}
    lines = [
        f"Each row's grid ran with seed {selection['seeds'][0]}; the choice maximizes "
        f"`{rule['maximize']}`"
        + (f", ties broken by the lowest `{rule['then_minimize']}`" if "then_minimize" in rule
           else "")
        + " (a validation split of the target task, disjoint from its test prompts); the other "
        f"seeds ({', '.join(map(str, selection['seeds'][1:]))}) then ran at the chosen point.",
        "",
        "| method | grid point | validation score | tie-break | test target | general after |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    collapsed_rows, edge_rows = [], []
    for label, row in selection["rows"].items():
        flags = []
        for j, g in enumerate(row["grid"]):
            s = by_name.get(g["run"], {})
            point = ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float)
                              else f"{k.split('.')[-1]}={v}" for k, v in g["point"].items())  # fmt: skip
            chosen = j == row["chosen"]
            flags.append(_collapsed(s, target, general, metric))
            cells = [
                label if j == 0 else "",
                f"**{point}** (chosen)" if chosen else point,
                _pct(g.get("maximize")),
                f"{g['then_minimize']:.3g}" if g.get("then_minimize") is not None else "–",
                _pct(s.get(f"final/{target}/{metric}")),
                _pct(s.get(f"final/{general}/{metric}")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if flags[row["chosen"]]:
            collapsed_rows.append((label, all(flags)))
        if _at_grid_edge(row):
            edge_rows.append(label)
    lines.append("")
    for label, every in collapsed_rows:
        lines.append(
            f"- {label}: the chosen point learned none of the target and lost the general "
            + ("tasks; so did every point of its grid." if every
               else "tasks, though another grid point did not (the validation rule chose it).")
        )  # fmt: skip
    if edge_rows:
        lines.append(
            f"- At the edge of its grid (the best value may lie beyond it): {', '.join(edge_rows)}."
        )
    return lines


def _at_grid_edge(row: dict) -> bool:
    """The chosen point is the first or last value of a one-parameter grid of
    at least three points whose score still rose towards that end."""
    grid = row["grid"]
    if len(grid) < 3 or len(grid[0]["point"]) != 1:
        return False
    j = row["chosen"]
    if j not in (0, len(grid) - 1):
        return False
    inner = grid[1] if j == 0 else grid[-2]
    return (grid[j].get("maximize") or 0.0) > (inner.get("maximize") or 0.0)


def _collapsed(summary, target, general, metric) -> bool:
    t = summary.get(f"final/{target}/{metric}")
    before, after = (
        summary.get(f"base/{general}/{metric}"),
        summary.get(f"final/{general}/{metric}"),
    )
    if None in (t, before, after) or not before:
        return False
    base_t = summary.get(f"base/{target}/{metric}") or 0.0
    return t <= base_t and after <= 0.1 * before


def _pct(v) -> str:
    return "–" if v is None else f"{v * 100:.1f}"


def _comparisons(rows, pairs, target, general, metric) -> list[str]:
    """For each declared pair of rows: the difference in target score and in
    forgetting, with Welch's 95% interval, and whether it is resolved."""
    by_label = {r["label"]: r for r in rows}
    tkey, fkey = f"final/{target}/{metric}", forgetting_key(general, metric)
    lines = [
        "Differences of means over seeds (points), first row minus second, with the half-width "
        "of Welch's 95% interval; *resolved* when the interval excludes zero.",
        "",
        "| comparison | target Δ | resolved | forgetting Δ | resolved |",
        "|---|---|---|---|---|",
    ]
    for a, b in pairs:
        if a not in by_label or b not in by_label:
            continue
        cells = [f"{a} − {b}"]
        for key in (tkey, fkey):
            d = difference(values_of(by_label[a], key), values_of(by_label[b], key))
            if d.diff is None:
                cells += ["–", "–"]
                continue
            half = "" if d.ci95 is None else f" ± {d.ci95 * 100:.1f}"
            verdict = {True: "yes", False: "no", None: "– (one seed)"}[d.resolved]
            cells += [f"{d.diff * 100:+.1f}{half}", verdict]
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
    selection = read_selection(sweep_dir)
    groups = None if not selection else {k: v["runs"] for k, v in selection["rows"].items()}
    rows = aggregate(runs, target, general, metric, groups)
    lines = [f"# Report: {os.path.basename(os.path.abspath(sweep_dir))}", ""]
    counted = sum(r["seeds"] for r in rows)
    lines.append(
        f"{counted} runs in {len(rows)} configurations"
        + (f" ({len(runs)} in all with the selection grid)" if counted != len(runs) else "")
        + f". Target set `{target}`, general set `{general}`, metric `{metric}`: "
        "mean ± the half-width of its 95% confidence interval over seeds (Student's t), "
        "where there are several."
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
    if selection:
        lines += ["## Hyperparameter selection", ""]
        lines += _selection_section(selection, runs, target, general, metric) + [""]
    lines += _matched_section(rows, metric)
    if selection and selection.get("comparisons"):
        lines += ["## Comparisons", ""]
        lines += _comparisons(rows, selection["comparisons"], target, general, metric) + [""]
    lines += ["## Findings", ""]
    lines += [f"- {s}" for s in findings(rows, metric, target, general)] + [""]
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
    curves = plot_learning_forgetting_curves(rows, metric)
    figures = {
        "learning_vs_forgetting.png": plot_learning_vs_forgetting(rows, metric),
        "training_curves.png": plot_curves(rows),
        "target_vs_params.png": plot_target_vs_params(rows, metric),
    }
    lines += ["## Plots", ""]
    if curves is not None:
        figures["learning_forgetting_curves.png"] = curves
        lines += ["![learning and forgetting along training](learning_forgetting_curves.png)", ""]
    lines += ["![learning vs forgetting](learning_vs_forgetting.png)", ""]
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
