"""The forgetting study's quick variant end to end: sweep (with its
pre-training prerequisite), evaluation, report; and the sweep runner's
skip/emit/validation behaviour."""

import functools
import json
import os
import subprocess

import pytest
from hf_fixtures import run_script, script_cmd, script_env

pytestmark = pytest.mark.slow  # sweeps of training runs in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "experiments", "forgetting", "study.py")


script = functools.partial(run_script, check=True, timeout=900)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    # Two runs at a time, as `python -m ftjax` runs the study on a 2-core machine.
    script("sweep.py", f"--config={STUDY}:quick=1", f"--workdir={d}", "--quiet", "--jobs=2")
    return d


def _chosen(sweep_dir) -> dict:
    """Each row's runs (seeds) as the sweep's selection stage chose them."""
    selection = json.loads((sweep_dir / "selection.json").read_text())
    return {label: row["runs"] for label, row in selection["rows"].items()}


LORA = "lora_r=4,lr=0.003,seed=0"


def test_every_run_has_its_files(sweep_dir):
    runs = sorted(p for p in os.listdir(sweep_dir) if (sweep_dir / p).is_dir())
    chosen = _chosen(sweep_dir)
    grid = ["full,lr=0.001,seed=0", "full,lr=0.003,seed=0", LORA, "qlora_r=4,lr=0.003,seed=0"]
    finals = [names[1] for names in chosen.values()]
    assert runs == sorted(["base", *grid, *finals])
    assert chosen["full"][0] in grid and chosen["lora r=4"] == [LORA, "lora_r=4,lr=0.003,seed=1"]
    for run in runs:
        for f in ("config.json", "metrics.jsonl", "summary.json"):
            assert (sweep_dir / run / f).exists(), (run, f)
    s = json.loads((sweep_dir / LORA / "summary.json").read_text())
    for key in (
        "base/general/exact_match",
        "final/target/exact_match",
        "final/target_val/exact_match",
        "forgetting/general/exact_match_drop",
        "analysis/energy_rank_90",
    ):
        assert key in s, key
    # Forgetting is exactly base minus final, from the same evaluation.
    assert s["forgetting/general/exact_match_drop"] == pytest.approx(
        s["base/general/exact_match"] - s["final/general/exact_match"]
    )
    # LoRA changes the adapted matrices with rank at most r.
    assert 1 <= s["analysis/energy_rank_90"] <= 4
    assert (sweep_dir / LORA / "adapter" / "adapter_config.json").exists()
    # The base model was exported in HF layout for the fine-tuning runs.
    assert (sweep_dir / "base" / "hf" / "model.safetensors").exists()
    # Concurrent runs logged to files and recorded that they shared the machine.
    assert s["concurrent_runs"] == 2 and (sweep_dir / chosen["full"][1] / "run.log").exists()
    # Seeds change the data order too: full tuning's two seeds differ.
    f0, f1 = (json.loads((sweep_dir / n / "summary.json").read_text()) for n in chosen["full"])
    assert f0["final/target/loss"] != f1["final/target/loss"]


def test_runs_record_learning_and_forgetting_curves(sweep_dir):
    """Exact match on every eval set at step 0 (the base), every
    `train.eval_every` steps and at the end, on the curve's first prompts;
    at step 0 it equals the base's score on those prompts, at the end the
    final score when the curve covers the whole eval set."""
    from ftjax.study.sweep import load_study

    cfg = load_study(STUDY).get_config("quick=1")
    every, steps = cfg.train.eval_every, cfg.train.steps
    records = [
        json.loads(line) for line in (sweep_dir / LORA / "metrics.jsonl").read_text().splitlines()
    ]
    curve = [r for r in records if "curve/target/exact_match" in r]
    assert [r["step"] for r in curve] == sorted({0, *range(every, steps, every), steps})
    for r in curve:
        assert {"curve/general/exact_match", "curve/target_val/exact_match"} <= set(r)
        assert "eval/general/loss" in r  # the loss curve at the same steps
    s = json.loads((sweep_dir / LORA / "summary.json").read_text())
    if not cfg.train.eval_max_batches:  # else the curve's losses are on the first batches only
        assert curve[0]["eval/general/loss"] == pytest.approx(s["base/general/loss"], rel=1e-5)
    else:
        assert curve[0]["eval/general/loss"] == pytest.approx(s["base/general/loss"], rel=0.2)
    if cfg.eval.curve_examples >= cfg.eval.max_examples:
        assert curve[-1]["curve/target/exact_match"] == s["final/target/exact_match"]


def test_report_tables_and_plots(sweep_dir):
    out = script("report.py", f"--workdir={sweep_dir}")
    assert "report.md" in out.stdout
    md = (sweep_dir / "report.md").read_text()
    assert "| full | 2 |" in md  # two seeds aggregated into one row
    assert "± " in md
    assert "| lora r=4 | 2 |" in md and "| qlora r=4 | 2 |" in md
    assert "## Findings" in md and "Pareto front" in md
    for section in ("## Hyperparameter selection", "## Forgetting at matched learning",
                    "## Comparisons"):  # fmt: skip
        assert section in md, section
    assert "(chosen)" in md and "full − lora r=4" in md
    from ftjax.study import build_report

    report = build_report(str(sweep_dir))
    assert sorted(report.figures) == sorted(
        ["learning_vs_forgetting.png", "training_curves.png", "target_vs_params.png",
         "weight_analysis.png", "learning_forgetting_curves.png"])  # fmt: skip
    for png in report.figures:
        assert (sweep_dir / png).exists(), png
    rows = {r["label"]: r for r in report.rows}
    ax = report.figures["learning_vs_forgetting.png"].axes[0]
    points = {c.get_label(): c.lines[0].get_xydata().ravel().tolist() for c in ax.containers}
    assert set(points) == set(rows)  # one point per configuration, at the table's values
    for label, row in rows.items():
        want = [row["target"].mean * 100, row["forgetting"].mean * 100]
        assert points[label] == pytest.approx(want), label
    curves = report.figures["training_curves.png"].axes[0].lines
    assert {line.get_label() for line in curves} == set(rows)
    assert all(len(line.get_xdata()) > 1 for line in curves)
    bars = report.figures["weight_analysis.png"].axes[0].patches
    assert [b.get_height() for b in bars] == pytest.approx(
        [r["energy_rank"].mean for r in report.rows if r["energy_rank"].mean is not None]
    )
    assert "base" not in [
        line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")
    ]


def test_finished_runs_are_skipped(sweep_dir):
    out = script("sweep.py", f"--config={STUDY}:quick=1", f"--workdir={sweep_dir}", "--quiet")
    assert out.stdout.count("finished, skipped") == 8  # base, 4 grid runs, 3 finals
    assert "stage final: 3 run(s)" in out.stdout


def test_emit_commands(sweep_dir):
    out = script(
        "sweep.py", f"--config={STUDY}:quick=1", f"--workdir={sweep_dir}", "--emit=commands"
    )
    lines = out.stdout.strip().splitlines()
    # Prerequisite, grid, then (the grid has finished) the final seeds.
    assert len(lines) == 8 and "--only=base" in lines[0]
    assert "--only=lora_r=4,lr=0.003,seed=1" in out.stdout
    assert all(
        "python -m ftjax.study.runner" in line and f"--workdir={sweep_dir}" in line
        for line in lines
    )


def test_bad_study_arg_is_one_line(tmp_path):
    out = script(
        "sweep.py", f"--config={STUDY}:quick=1,methd=lora", f"--workdir={tmp_path}", check=False
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("error: config arg: unknown key(s) ['methd']")
    )
    out = script("sweep.py", "--config=experiments/nope.py", f"--workdir={tmp_path}", check=False)
    assert out.returncode == 2 and "no such experiment file" in out.stderr


def test_evaluate_script_reproduces_the_run_metrics(sweep_dir, tmp_path):
    run = sweep_dir / LORA
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "eval.json"
    script("evaluate.py", f"--workdir={run}", f"--out={out}")
    ev = json.loads(out.read_text())
    assert ev["checkpoint_step"] == summary["steps"]
    for key in ("final/target/loss", "final/general/exact_match", "base/general/loss"):
        assert ev[key] == pytest.approx(summary[key], rel=1e-5), key


def test_export_script_writes_loadable_weights(sweep_dir, tmp_path):
    import numpy as np
    import transformers

    run = sweep_dir / LORA
    script("export.py", f"--workdir={run}", f"--out={tmp_path}")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert np.isfinite(
        model(**{"input_ids": __import__("torch").tensor([[1, 5, 6]])}).logits.detach().numpy()
    ).all()


def test_sweep_override_of_missing_field_and_empty_report(tmp_path):
    study = tmp_path / "study.py"
    study.write_text(
        "from ftjax.train import default_config\n"
        "def get_config(arg=None):\n    return default_config()\n"
        "def get_sweep():\n    return [{'optim.lrate': 0.1}]\n"
    )
    out = script("sweep.py", f"--config={study}", f"--workdir={tmp_path / 'w'}", check=False)
    assert out.returncode == 2
    assert "error: sweep entry 0: unknown config key 'optim.lrate'" in out.stderr
    out = script("report.py", f"--workdir={tmp_path}", check=False)
    assert out.returncode == 2 and "no completed runs" in out.stderr.strip().splitlines()[-1]


def _sweep_study(tmp_path, n):
    study = tmp_path / "study.py"
    study.write_text(  # a valid config (the sweep checks them all): no file it names is read
        "from ftjax.data import source_config\n"
        "from ftjax.train import default_config\n"
        "def get_config(arg=None):\n    cfg = default_config()\n"
        "    cfg.data.tokenizer = 'tok'\n"
        "    cfg.data.sources.target = source_config('train.jsonl')\n"
        "    return cfg\n"
        f"def get_sweep():\n    return [{{'train.seed': i}} for i in range({n})]\n"
    )
    return str(study)


def test_parallel_sweep_pins_runs_and_stops_at_a_failure(tmp_path):
    """run_sweep with jobs=2 (run_one stubbed: no training): two runs at a
    time on disjoint cores; after a failure no new run starts, the running one
    finishes, and the failure is raised naming the run and its log."""
    import threading
    import time

    from ftjax.study.runner import RunFailed, core_groups, run_sweep

    groups = core_groups(2)
    if os.cpu_count() >= 2 and hasattr(os, "sched_getaffinity"):
        assert set(groups[0]).isdisjoint(groups[1]) and groups[0] and groups[1]
    lock, active, seen = threading.Lock(), [0], []

    def run_one(spec, run_dir, cores=None):
        with lock:
            active[0] += 1
            seen.append((spec.name, cores, active[0]))
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        if spec.name == "seed=1":
            raise RunFailed(spec.name, 3, os.path.join(run_dir, "run.log"))
        return {"status": "completed", "name": spec.name}

    import io

    with pytest.raises(RunFailed, match=r"run seed=1 failed with exit code 3 \(log: .*run.log\)"):
        run_sweep(
            _sweep_study(tmp_path, 5), str(tmp_path / "w"), run_one, jobs=2, out=io.StringIO()
        )
    names = [name for name, _, _ in seen]
    assert names[:2] == ["seed=0", "seed=1"] and max(n for _, _, n in seen) == 2
    # seed=0 and seed=1 ran together; at most one more started before seed=1 failed.
    assert len(names) <= 3 and "seed=4" not in names
    assert {c for _, c, _ in seen[:2]} == set(groups)


def test_jobs_below_one_is_a_one_line_error(tmp_path):
    out = script(
        "sweep.py", f"--config={STUDY}:quick=1", f"--workdir={tmp_path}", "--jobs=0", check=False
    )
    assert out.returncode != 0 and "--jobs=0; expected an int >= 1" in out.stderr


def test_killed_sweep_resumes_to_the_same_results(sweep_dir, tmp_path):
    """SIGKILL the sweep while its runs train: the runs get SIGTERM from the
    kernel (they checkpoint and exit, no orphan keeps writing); the same
    command then finishes only what was missing, with the uninterrupted
    sweep's numbers."""
    import time

    work = tmp_path / "w"
    args = [f"--config={STUDY}:quick=1", f"--workdir={work}", "--quiet", "--jobs=2"]
    proc = subprocess.Popen(
        script_cmd("sweep.py", *args),
        env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    # Wait for the state the test needs, not for a time: a fine-tuning run has
    # logged a training step, so its SIGTERM handler is installed and it is
    # mid-training (or past it, with its final checkpoint on disk).
    deadline = time.time() + 900
    while not any(_logged_steps(p) for p in work.glob("*,seed=*/metrics.jsonl")):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    # The orphaned runs save and exit on their SIGTERM: wait until none is left.
    while _processes_of(work):
        assert time.time() < deadline, "runs outlived their sweep"
        time.sleep(0.2)

    def completed(run_dir):
        path = run_dir / "summary.json"
        return path.exists() and json.loads(path.read_text()).get("status") == "completed"

    done_before = {p.name for p in work.glob("*") if completed(p)}
    interrupted = {p.name for p in work.glob("*,seed=*") if not completed(p)}
    assert "base" in done_before and interrupted, (done_before, interrupted)
    out = script("sweep.py", *args)
    for name in done_before:
        assert f"{name}: finished, skipped" in out.stdout, name
    resumed = [
        n for n in interrupted
        if json.loads((work / n / "summary.json").read_text()).get("resumed_from") is not None
    ]  # fmt: skip
    assert resumed, "no run resumed from the checkpoint its SIGTERM saved"
    for run in [*_chosen(sweep_dir)["full"], LORA]:
        want = json.loads((sweep_dir / run / "summary.json").read_text())
        got = json.loads((work / run / "summary.json").read_text())
        assert got["steps"] == want["steps"]
        for key in ("final/target/loss", "final/general/loss", "final/target/exact_match"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (run, key)


def _logged_steps(metrics_path) -> list[int]:
    """The training steps a run has logged (its metrics file may be mid-write)."""
    steps = []
    for line in metrics_path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


def _processes_of(workdir) -> str:
    out = subprocess.run(["pgrep", "-f", f"--workdir={workdir}"], capture_output=True, text=True)
    return out.stdout.strip()
