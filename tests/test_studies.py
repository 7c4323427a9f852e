"""The study and paper configs beyond the forgetting study: the LoRA paper's
E2E setting and the LLM configs (SFT, "LoRA learns less and forgets less") run
a few steps offline on a tiny local checkpoint and local stand-in data, through
the same `ftjax.train.train` path a hub name takes, and fail with one line on
a hub name offline; the data-quality study's quick variant runs end to end and
its report shows memorization per noise rate."""

import importlib.util
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import TINY_CONFIGS, script_cmd, script_env, write_jsonl

from ftjax.data import build_char_tokenizer
from ftjax.study import evaluate_run, training_eval_sets, write_report
from ftjax.study.sweep import load_study
from ftjax.train import train

pytestmark = pytest.mark.slow  # trains studies' runs, some in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E2E = os.path.join(ROOT, "experiments", "lora_paper", "e2e.py")
SFT = os.path.join(ROOT, "experiments", "llm", "sft.py")
LLFL = os.path.join(ROOT, "experiments", "llm", "learns_less_forgets_less.py")
HARNESS = os.path.join(ROOT, "experiments", "llm", "harness.py")
DATA_QUALITY = os.path.join(ROOT, "experiments", "data_quality", "study.py")


def script(name, *args):
    """`scripts/<name>` started in the background (several run at once)."""
    return subprocess.Popen(
        script_cmd(name, *args),
        env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def tiny_checkpoint(family: str, out_dir) -> str:
    """A random tiny HF checkpoint with the synthetic suite's character
    tokenizer saved next to it; the vocabulary is widened to 128 so that every
    tokenizer id (103 of them) has an embedding row."""
    config = TINY_CONFIGS[family]()
    config.vocab_size = 128
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(out_dir))
    build_char_tokenizer(str(out_dir))
    return str(out_dir)


def check_run(result, workdir, steps):
    s = result.summary
    assert s["status"] == "completed" and s["steps"] == steps
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert records[-1]["step"] == steps
    return s


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return tiny_checkpoint("gpt2", tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_checkpoint("llama3", tmp_path_factory.mktemp("llama"))


# ----------------------------------------------------------------------------- LoRA paper E2E


def test_e2e_paper_setting_runs_offline(gpt2_dir, tmp_path):
    e2e = load_study(E2E)
    data = e2e.write_standin(str(tmp_path / "e2e.jsonl"), n=64)
    # Without steps=: 5 epochs of batches of 8 over the rows that train
    # (64 rows minus the 5% eval carve = 61 -> 8 batches per epoch).
    cfg = e2e.get_config(f"local=1,checkpoint={gpt2_dir},data={data}")
    assert cfg.train.steps == 5 * 8
    assert (cfg.method.name, cfg.method.rank, cfg.method.alpha, cfg.method.targets,
            cfg.method.dropout) == ("lora", 4, 32.0, "qv", 0.1)  # fmt: skip
    # The paper's 500 warm-up steps, capped by a run shorter than that (40 steps here).
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule, cfg.optim.warmup_steps) == (
        2e-4, 0.01, "linear", 40)  # fmt: skip
    assert (cfg.data.batch_size, cfg.data.packing, cfg.train.label_smoothing) == (8, False, 0.1)
    # The hub setting: 26,290 steps from E2E's 42,061 training examples.
    hub = e2e.get_config()
    assert hub.train.steps == 26290 and hub.model.checkpoint == "gpt2-medium"
    assert hub.data.sources.e2e.hub == "e2e_nlg"

    cfg = e2e.get_config(f"local=1,checkpoint={gpt2_dir},data={data},steps=3")
    s = check_run(train(cfg, str(tmp_path / "run")), str(tmp_path / "run"), 3)
    # One rank-4 adapter on the fused c_attn: d*r + r*3d per layer (d=32, 2 layers).
    assert s["trainable_params"] == 2 * (32 * 4 + 4 * 96)
    assert os.path.exists(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert math.isfinite(s["eval/e2e/loss"])


# ----------------------------------------------------------------------------- LLM configs


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_data")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(48):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        rows.append(
            {"query": f"What is {a}+{b}?", "response": f"{a}+{b}={a + b}. The answer is: {a + b}"}
        )
    return write_jsonl(d / "math.jsonl", rows)


def test_sft_qlora_runs_offline(llama_dir, sft_data, tmp_path):
    sft = load_study(SFT)
    arg = (f"model={llama_dir},dataset={sft_data},format=prompt_completion,prompt=query,"
           "completion=response,steps=3,batch=4,seq_len=64,dtype=float32")  # fmt: skip
    cfg = sft.get_config(arg + ",method=qlora")
    assert cfg.data.sources.sft.path == sft_data and not cfg.data.sources.sft.hub
    # QLoRA defaults: r=16 on every linear layer over an NF4 base.
    assert (cfg.method.name, cfg.method.rank, cfg.method.targets) == ("qlora", 16, "all-linear")
    s = check_run(train(cfg, str(tmp_path)), str(tmp_path), 3)
    assert 0 < s["trainable_share"] < 1
    assert os.path.exists(tmp_path / "adapter" / "adapter_config.json")
    # Full fine-tuning has no adapter: it exports merged HF weights instead.
    full = sft.get_config(arg + ",method=full")
    assert full.method.name == "full" and full.train.export_hf
    assert full.optim.lr == pytest.approx(1e-5) and cfg.optim.lr == pytest.approx(1e-4)


def test_sft_hub_dataset_id_is_a_hub_source():
    cfg = load_study(SFT).get_config("dataset_config=main,prompt=question,completion=answer,"
                                     "dataset=openai/gsm8k,method=lora,rank=8")  # fmt: skip
    src = cfg.data.sources.sft
    assert (src.hub, src.hub_config, src.path, src.fields.prompt) == (
        "openai/gsm8k", "main", "", "question")  # fmt: skip
    assert cfg.method.rank == 8 and cfg.optim.lr == pytest.approx(1e-4)


MC_ITEMS = [
    {"question": "2+2=", "choices": ["4", "5", "22"], "label": 0},
    {"question": "3+1=", "choices": ["2", "4"], "label": 1},
    {"question": "abc reversed:", "choices": ["cba", "abc"], "label": 0},
]


def test_learns_less_forgets_less_offline(llama_dir, sft_data, tmp_path):
    """Train one LoRA run on local stand-ins, then score base and tuned models
    through the harness adapter on a local multiple-choice task."""
    text = tmp_path / "general.txt"
    text.write_text(
        "The quick brown fox jumps over the lazy dog.\nA general sentence or two.\n" * 8
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = write_jsonl(tasks / "mc.jsonl", MC_ITEMS)
    (tasks / "mc.yaml").write_text(
        f"task: llfl_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
    )
    study = load_study(LLFL)
    assert [r["arg"] for r in study.get_sweep()] == [
        "method=full", "method=lora,rank=16", "method=lora,rank=256"]  # fmt: skip
    cfg = study.get_config(
        f"model={llama_dir},dataset={sft_data},general_text={text},method=lora,rank=4,steps=3,"
        f"batch=4,seq_len=64,dtype=float32,harness_include={tasks},target_tasks=llfl_tiny_mc,"
        "general_tasks=llfl_tiny_mc"
    )
    assert (cfg.method.rank, cfg.method.alpha, cfg.method.targets) == (4, 8.0, "all-linear")
    run = tmp_path / "sweep" / "method=lora,rank=4"
    result = train(cfg, str(run))
    check_run(result, str(run), 3)
    # The final losses are the training loop's last evaluation, not computed again ...
    final_sets = training_eval_sets(result.summary, cfg)
    out = evaluate_run(result, cfg, str(run), final_sets=final_sets, extra={"checkpoint_step": 3})
    assert out["checkpoint_step"] == 3
    names = result.pipeline.eval_names
    assert set(final_sets) == set(names)
    for name in names:
        assert out[f"final/{name}/loss"] == result.summary[f"eval/{name}/loss"]
    # ... and they are the numbers ftjax.eval computes for the merged weights.
    from ftjax import peft
    from ftjax.eval import evaluate_sets

    merged = peft.merge(result.params)
    again = evaluate_sets(result.model, merged, {n: result.pipeline.eval_batches(n) for n in names})
    for name in names:
        assert out[f"final/{name}/loss"] == pytest.approx(again[name]["loss"], rel=1e-5)
        assert out[f"final/{name}/token_accuracy"] == pytest.approx(again[name]["accuracy"])
    summary = json.load(open(run / "summary.json"))
    assert summary["evaluated"] is True and json.load(open(run / "eval.json")) == out
    # General text is eval-only: its loss before and after is perplexity forgetting.
    assert result.summary["data"]["sources"]["general_text"]["train_examples"] == 0
    assert out["forgetting/general_text/loss_increase"] == pytest.approx(
        out["final/general_text/loss"] - out["base/general_text/loss"], abs=1e-12
    )
    assert math.isfinite(out["forgetting/general_text/loss_increase"])

    pytest.importorskip("lm_eval")
    spec = importlib.util.spec_from_file_location("llm_harness", HARNESS)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    keys = harness.evaluate_run_dir(str(run))
    summary = json.load(open(run / "summary.json"))
    for k in (
        "base/llfl_tiny_mc/acc",
        "final/llfl_tiny_mc/acc",
        "forgetting/harness_general/score_drop",
    ):
        assert k in keys and k in summary, k
    assert keys["forgetting/harness_general/score_drop"] == pytest.approx(
        keys["base/harness_general/score"] - keys["final/harness_general/score"]
    )
    # A sweep-wide pass scores only runs not yet scored: this one is.
    assert harness.evaluate_sweep(str(run.parent)) == []


def test_hub_names_fail_offline_with_one_line(llama_dir, sft_data, tmp_path):
    procs = {
        "gpt2-medium": script("train.py", f"--config={E2E}", f"--workdir={tmp_path / 'e2e'}"),
        "meta-llama/Llama-2-7b-hf": script("train.py", f"--config={LLFL}", f"--workdir={tmp_path / 'llfl'}"),
        "openai/gsm8k": script(
            "train.py", f"--config={SFT}:model={llama_dir},dtype=float32", f"--workdir={tmp_path / 'sft'}"),
    }  # fmt: skip
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, err[-2000:])
        assert lines[-1].startswith("error: ") and name in lines[-1], (name, err[-2000:])
        assert "Traceback" not in err


# ----------------------------------------------------------------------------- data quality


def test_data_quality_quick_sweep_and_report(tmp_path):
    proc = script(
        "sweep.py", f"--config={DATA_QUALITY}:quick=1", f"--workdir={tmp_path}", "--quiet"
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    # One base for every noise rate, pre-trained on clean data.
    base = json.load(open(tmp_path / "base" / "config.json"))
    assert base["study"]["noise"] == 0.0
    runs = {}
    for name in ("method=full,noise=0", "method=full,noise=0.5"):
        s = json.load(open(tmp_path / name / "summary.json"))
        assert s["status"] == "completed"
        runs[name] = s
    noisy = runs["method=full,noise=0.5"]
    assert noisy["variant"] == "noise=0.5" and noisy["label"] == "full noise=50%"
    assert 0.0 <= noisy["extra/memorized_wrong"] <= 1.0
    assert 0.0 <= noisy["extra/corrupted_recovered"] <= 1.0
    assert runs["method=full,noise=0"]["extra/memorized_wrong"] == 0.0  # nothing corrupted
    md = open(write_report(str(tmp_path))).read().splitlines()
    # The memorization table: one row per method and noise rate.
    header = md.index("| method | corrupted_recovered | memorized_wrong |")
    rows = {line.split("|")[1].strip(): line for line in md[header + 2 : header + 4]}
    assert set(rows) == {"full noise=0%", "full noise=50%"}
    assert f"| {noisy['extra/memorized_wrong'] * 100:.1f} |" in rows["full noise=50%"]


# ----------------------------------------------------------------------------- methods

METHODS_STUDY = os.path.join(ROOT, "experiments", "methods", "study.py")


def test_methods_quick_sweep_and_report(tmp_path):
    """The methods study end to end on its quick rows (full, LoRA, and three
    methods new to the study machinery: GaLore's optimizer, AdaLoRA's
    allocator and penalty, prompt tuning's virtual tokens through generation)."""
    proc = script(
        "sweep.py", f"--config={METHODS_STUDY}:quick=1", f"--workdir={tmp_path}", "--quiet",
        "--jobs=2",
    )  # fmt: skip
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    selection = json.load(open(tmp_path / "selection.json"))
    assert set(selection["rows"]) == {
        "full", "lora r=4", "galore r=4", "adalora r=4→2", "prompt tuning (4 tokens)",
    }  # fmt: skip
    for row in selection["rows"].values():
        for name in row["runs"]:
            s = json.load(open(tmp_path / name / "summary.json"))
            assert s["status"] == "completed" and "final/target/exact_match" in s, name
    md = open(write_report(str(tmp_path))).read()
    for label in selection["rows"]:
        assert f"| {label} |" in md, label


# ----------------------------------------------------------------------------- MiniLM

MINILM_STUDY = os.path.join(ROOT, "experiments", "minilm", "study.py")


def test_minilm_quick_sweep_and_report(tmp_path):
    """The real-weights study end to end (quick): MiniLM loaded from the
    installed package with a fresh head per seed, classification metrics on
    the test and validation sets, the sentence-embedding probe before and
    after, and the report on target accuracy against paraphrase retrieval."""
    proc = script(
        "sweep.py", f"--config={MINILM_STUDY}:quick=1", f"--workdir={tmp_path}", "--quiet",
        "--jobs=2",
    )  # fmt: skip
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    selection = json.load(open(tmp_path / "selection.json"))
    assert set(selection["rows"]) == {"full", "lora r=8 (q,v)"}
    for row in selection["rows"].values():
        for name in row["runs"]:
            s = json.load(open(tmp_path / name / "summary.json"))
            for key in (
                "final/target/accuracy",
                "final/target/mcc",
                "final/target_val/accuracy",
                "base/embedding/accuracy",
                "final/embedding/accuracy",
                "forgetting/embedding/accuracy_drop",
                "final/embedding/similarity_kept",
            ):
                assert key in s, (name, key)  # fmt: skip
            assert s["forgetting/embedding/accuracy_drop"] == pytest.approx(
                s["base/embedding/accuracy"] - s["final/embedding/accuracy"]
            )
            assert -1.0 <= s["final/embedding/similarity_kept"] <= 1.0
    md = open(write_report(str(tmp_path), general="embedding", metric="accuracy")).read()
    assert "| full |" in md and "| lora r=8 (q,v) |" in md
