"""The report over hand-written run directories: the aggregation against
numpy, each table cell and finding from the stored summaries, and each plot's
content (plotted points, labels) read back from its matplotlib figure."""

import statistics

import matplotlib.image
import numpy as np
import pytest

from ftjax.errors import RunDirError
from ftjax.study import RunDir, aggregate_values, build_report, write_report
from ftjax.study.report import forgetting_key, pareto_front

GIB = 2**30


def _summary(method, target, general_after, steps=10, **extra):
    return {
        "status": "completed",
        "method": method,
        "lr": 1e-3 if method["name"] == "full" else 3e-3,
        "trainable_params": 1000 if method["name"] == "full" else 40,
        "trainable_share": 1.0 if method["name"] == "full" else 0.04,
        "train_state_bytes": 4 * GIB if method["name"] == "full" else GIB,
        "peak_rss_bytes": 2 * GIB,
        "tokens_per_s": 1234.5,
        "wall_time_s": 12.0,
        "steps": steps,
        "base/general/exact_match": 0.9,
        "base/target/exact_match": 0.0,
        "final/target/exact_match": target,
        "final/general/exact_match": general_after,
        "forgetting/general/exact_match_drop": 0.9 - general_after,
        "forgetting/general/loss_increase": 2 * (0.9 - general_after),
        "final/target/loss": 1.0 - target,
        "analysis/energy_rank_90": 8.0 if method["name"] == "full" else 3.0,
        "analysis/intruders": 1.0,
        "analysis/relative_update_norm": 0.1,
        **extra,
    }


@pytest.fixture()
def sweep(tmp_path):
    full = {"name": "full"}
    lora = {"name": "lora", "rank": 4, "targets": "all-linear"}
    runs = {
        "full,seed=0": _summary(full, 1.0, 0.2),
        "full,seed=1": _summary(full, 0.8, 0.3),
        "lora,seed=0": _summary(lora, 0.6, 0.7, **{"extra/memorized_wrong": 0.25}),
        "base": {"status": "completed", "role": "prerequisite"},
        "unfinished": {"status": "preempted"},
    }
    for name, summary in runs.items():
        run = RunDir(tmp_path / name)
        run.append_metrics({"step": s, "loss": 4.0 / s} for s in range(1, 4))
        run.write_summary(summary)
    return tmp_path


def test_aggregate_values_against_statistics():
    values = [0.5, 0.25, 0.75, None, float("nan")]
    s = aggregate_values(values)
    xs = [0.5, 0.25, 0.75]
    assert s.n == 3 and s.mean == pytest.approx(statistics.fmean(xs))
    assert s.std == pytest.approx(statistics.stdev(xs))
    assert s.ci95 == pytest.approx(
        4.303 * statistics.stdev(xs) / np.sqrt(3), rel=1e-4
    )  # t(0.975, 2)
    one = aggregate_values([2.0])
    assert (one.mean, one.std, one.n, one.ci95) == (2.0, 0.0, 1, None)
    assert aggregate_values([None]).mean is None and aggregate_values([]).n == 0
    assert aggregate_values([True, "x", 1]).n == 1  # only numbers count


def test_forgetting_key_follows_the_metric_direction():
    assert forgetting_key("general", "exact_match") == "forgetting/general/exact_match_drop"
    assert forgetting_key("general", "loss") == "forgetting/general/loss_increase"
    assert forgetting_key("harness_general", "score") == "forgetting/harness_general/score_drop"


def test_table_and_findings_come_from_the_summaries(sweep):
    report = build_report(str(sweep))
    md = report.markdown
    assert "3 runs in 2 configurations" in md  # base and the unfinished run left out
    full = next(r for r in report.rows if r["label"] == "full")
    assert full["seeds"] == 2 and full["target"].mean == pytest.approx(0.9)
    # ± is the 95% t-interval's half-width: t(0.975, df=1) = 12.706 times std / sqrt(2).
    half = lambda xs: 12.7062 * statistics.stdev(xs) / np.sqrt(len(xs)) * 100
    row = next(line for line in md.splitlines() if line.startswith("| full |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["full", "2", "1,000", "100%"]
    assert cells[4] == f"{90.0:.1f} ± {half([1.0, 0.8]):.1f}"  # target
    general = f"25.0 ± {half([0.2, 0.3]):.1f}"
    assert cells[5] == "90.0 ± 0.0" and cells[6] == general  # general before / after
    assert cells[7] == f"65.0 ± {half([0.7, 0.6]):.1f}"  # forgetting
    assert cells[9] == "4.1e+03 ± 0" and cells[13] == "0.001"  # train state (MB), lr
    lora_row = next(line for line in md.splitlines() if line.startswith("| lora r=4 all-linear |"))
    assert "| 60.0 |" in lora_row and "| 20.0 |" in lora_row  # one seed: no ± part
    assert (
        "Highest mean target exact_match: **full** (90.0%), forgetting 65.0 points; its lead "
        "over lora r=4 all-linear is untested (one seed)." in md
    )
    assert "Least mean forgetting: **lora r=4 all-linear** (20.0 points)" in md
    # One LoRA seed: no interval, so no difference counts as resolved.
    assert "0 of 1 PEFT configurations learned less on the target and 0 of 1 forgot less" in md
    assert "lora r=4 all-linear at 0.25× full fine-tuning's" in md
    # Further measurements: a run without the key shows "–".
    assert "| full | – |" in md and "| lora r=4 all-linear | 25.0 |" in md


def _points(container):
    """The (x, y) points of an errorbar plot, flattened for pytest.approx."""
    return container.lines[0].get_xydata().ravel().tolist()


def test_plots_show_the_table_values(sweep):
    report = build_report(str(sweep))
    rows = {r["label"]: r for r in report.rows}
    ax = report.figures["learning_vs_forgetting.png"].axes[0]
    assert ax.get_xlabel() == "target exact_match after fine-tuning (%)"
    assert ax.get_ylabel() == "forgetting: drop in general exact_match (points)"
    plotted = {c.get_label(): _points(c) for c in ax.containers}
    assert plotted["full"] == pytest.approx([90.0, 65.0])
    assert plotted["lora r=4 all-linear"] == pytest.approx([60.0, 20.0])
    # Both points are on the Pareto front: the dashed line joins them, by target.
    front = [line for line in ax.lines if line.get_label() == "Pareto front"]
    assert front[0].get_xydata().ravel().tolist() == pytest.approx([60, 20, 90, 65])

    ax = report.figures["training_curves.png"].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_yscale()) == ("step", "train loss", "log")
    curves = {line.get_label(): line.get_xydata().ravel().tolist() for line in ax.lines}
    assert curves["full"] == pytest.approx([1, 4.0, 2, 2.0, 3, 4.0 / 3])

    ax = report.figures["target_vs_params.png"].axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "target exact_match (%)"
    plotted = {c.get_label(): _points(c) for c in ax.containers}
    assert plotted["full"] == pytest.approx([1000, 90.0])
    assert plotted["lora r=4 all-linear"] == pytest.approx([40, 60.0])

    ranks, intruders = report.figures["weight_analysis.png"].axes
    heights = [p.get_height() for p in ranks.patches]
    assert heights == [
        rows["full"]["energy_rank"].mean,
        rows["lora r=4 all-linear"]["energy_rank"].mean,
    ]
    assert [t.get_text() for t in ranks.get_xticklabels()] == ["full", "lora r=4 all-linear"]
    assert [p.get_height() for p in intruders.patches] == [1.0, 1.0]


def test_write_report_saves_what_it_built(sweep, tmp_path):
    path = write_report(str(sweep))
    assert open(path).read() == build_report(str(sweep)).markdown
    for name in ("learning_vs_forgetting.png", "training_curves.png", "target_vs_params.png",
                 "weight_analysis.png"):  # fmt: skip
        image = matplotlib.image.imread(str(sweep / name))
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert np.ptp(image[..., :3]) > 0.5, name  # not a blank canvas
    with pytest.raises(RunDirError, match=r"no completed runs"):
        build_report(str(tmp_path / "unfinished"))


def test_pareto_front():
    pts = [(0.9, 0.6), (0.6, 0.2), (0.5, 0.3), (0.9, 0.7)]
    assert pareto_front(pts) == [0, 1]


# ----------------------------------------------------------------------------- selection
# A sweep with a selection stage: two rows, three seeds each, curves along
# training; one grid point of "lora" collapsed (nothing learned, general lost).

CURVES = {  # run -> [(step, target, general)]
    "full,lr=0.001,seed=0": [(0, 0.0, 0.9), (10, 0.5, 0.6), (20, 1.0, 0.4)],
    "full,lr=0.001,seed=1": [(0, 0.0, 0.9), (10, 0.3, 0.7), (20, 0.9, 0.5)],
    "full,lr=0.001,seed=2": [(0, 0.0, 0.9), (10, 0.6, 0.5), (20, 0.95, 0.45)],
    "lora,lr=0.003,seed=0": [(0, 0.0, 0.9), (10, 0.1, 0.9), (20, 0.6, 0.8)],
    "lora,lr=0.003,seed=1": [(0, 0.0, 0.9), (10, 0.5, 0.85), (20, 0.7, 0.8)],
    "lora,lr=0.003,seed=2": [(0, 0.0, 0.9), (10, 0.2, 0.9), (20, 0.3, 0.9)],
    "lora,lr=0.03,seed=0": [(0, 0.0, 0.9), (10, 0.0, 0.0), (20, 0.0, 0.0)],
}


@pytest.fixture()
def selected_sweep(tmp_path):
    import json

    full = {"name": "full"}
    lora = {"name": "lora", "rank": 4, "targets": "all-linear"}
    for name, points in CURVES.items():
        run = RunDir(tmp_path / name)
        run.append_metrics(
            {"step": st, "curve/target/exact_match": t, "curve/general/exact_match": g}
            for st, t, g in points
        )
        _, t, g = points[-1]
        run.write_summary(_summary(full if name.startswith("full") else lora, t, g))
    grid = lambda run, val: {"point": {"optim.lr": float(run.split("lr=")[1].split(",")[0])},
                             "run": run, "maximize": val, "then_minimize": 1.0}  # fmt: skip
    selection = {
        "rule": {"maximize": "final/target_val/exact_match",
                 "then_minimize": "final/target_val/loss"},
        "seeds": [0, 1, 2],
        "comparisons": [["full", "lora"]],
        "rows": {
            "full": {"arg": "", "grid": [grid("full,lr=0.001,seed=0", 0.9)], "chosen": 0,
                     "point": {"optim.lr": 0.001},
                     "runs": [f"full,lr=0.001,seed={s}" for s in range(3)]},
            "lora": {"arg": "", "grid": [grid("lora,lr=0.003,seed=0", 0.5),
                                         grid("lora,lr=0.03,seed=0", 0.0)],
                     "chosen": 0, "point": {"optim.lr": 0.003},
                     "runs": [f"lora,lr=0.003,seed={s}" for s in range(3)]},
        },
    }  # fmt: skip
    (tmp_path / "selection.json").write_text(json.dumps(selection))
    return tmp_path


def _table(md: str, heading: str) -> dict[str, list[str]]:
    """The first cell -> the other cells, of the table under `heading`."""
    part = md.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in part.splitlines() if ln.startswith("| ") and not ln.startswith("| ---")]
    return {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")[1:]]
            for r in rows[1:]}  # fmt: skip


def test_rows_are_the_selection_and_its_grid_is_shown(selected_sweep):
    report = build_report(str(selected_sweep))
    md = report.markdown
    assert [(r["label"], r["seeds"]) for r in report.rows] == [("full", 3), ("lora", 3)]
    assert "6 runs in 2 configurations (7 in all with the selection grid)" in md
    assert "**lr=0.003** (chosen)" in md and "| lr=0.03 |" in md
    # The collapsed grid point was not chosen: no note that the chosen one collapsed.
    assert "the chosen point learned none" not in md


def test_matched_learning_from_the_curves(selected_sweep):
    md = build_report(str(selected_sweep)).markdown
    table = _table(md, "## Forgetting at matched learning")
    # Full's final target mean is (1.0 + 0.9 + 0.95) / 3 = 0.95: the levels are
    # 47.5% and 85.5%. Full reaches 47.5% at step 10 in seeds 0 and 2 (drops
    # 0.3, 0.4) and at step 20 in seed 1 (drop 0.4).
    drops = [0.3, 0.4, 0.4]
    half = 4.3027 * statistics.stdev(drops) / np.sqrt(3) * 100
    assert table["full"][0] == f"{np.mean(drops) * 100:.3g} ± {half:.3g} (3/3)"
    steps = [10, 20, 10]
    assert (
        table["full"][1]
        == f"{np.mean(steps):.3g} ± {4.3027 * statistics.stdev(steps) / np.sqrt(3):.3g}"
    )
    # LoRA reaches 47.5% in seeds 0 (step 20, drop 0.1) and 1 (step 10, drop 0.05).
    lora = [0.1, 0.05]
    half = 12.7062 * statistics.stdev(lora) / np.sqrt(2) * 100
    assert table["lora"][0] == f"{np.mean(lora) * 100:.3g} ± {half:.3g} (2/3)"
    # 85.5%: only full gets there (at step 20 in every seed).
    assert table["lora"][2] == "not reached (0/3)"


def test_comparisons_are_welch_intervals(selected_sweep):
    md = build_report(str(selected_sweep)).markdown
    table = _table(md, "## Comparisons")
    full_t, lora_t = [1.0, 0.9, 0.95], [0.6, 0.7, 0.3]
    diff = np.mean(full_t) - np.mean(lora_t)
    va, vb = np.var(full_t, ddof=1) / 3, np.var(lora_t, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert 2 <= df < 3  # the table's t for df 2
    half = 4.3027 * np.sqrt(va + vb)
    cells = table["full − lora"]
    assert cells[0] == f"{diff * 100:+.1f} ± {half * 100:.1f}"
    assert cells[1] == ("yes" if diff > half else "no")


def test_learning_forgetting_curves_plot_the_seed_means(selected_sweep):
    fig = build_report(str(selected_sweep)).figures["learning_forgetting_curves.png"]
    ax_t, ax_g, ax_tg = fig.axes
    lines = {line.get_label(): line.get_xydata().ravel().tolist() for line in ax_tg.lines}
    full = np.mean([[(t, g) for _, t, g in CURVES[f"full,lr=0.001,seed={s}"]] for s in range(3)], 0)
    assert lines["full"] == pytest.approx((full * 100).ravel().tolist())
    target = {line.get_label(): line.get_xydata().tolist() for line in ax_t.lines}
    assert [x for x, _ in target["lora"]] == [0, 10, 20]
    # Every row its own colour and marker.
    styles = [(line.get_color(), line.get_marker()) for line in ax_tg.lines]
    assert len(set(styles)) == len(styles)


def test_choice_at_the_edge_of_its_grid_is_flagged():
    from ftjax.study.report import _at_grid_edge

    def row(scores, chosen):
        grid = [{"point": {"optim.lr": lr}, "maximize": v} for lr, v in zip([1, 2, 3], scores)]
        return {"grid": grid, "chosen": chosen}

    assert _at_grid_edge(row([0.2, 0.5, 0.9], 2))  # still rising at the top
    assert _at_grid_edge(row([0.9, 0.5, 0.2], 0))
    assert not _at_grid_edge(row([0.2, 0.9, 0.5], 1))  # bracketed
    assert not _at_grid_edge(row([0.9, 0.9, 0.2], 0))  # flat towards the edge: a tie
    assert not _at_grid_edge({"grid": row([0.2, 0.9, 0.5], 1)["grid"][:2], "chosen": 1})
