"""scripts/count_params.py on the LoRA paper's settings: the four exact counts,
from shapes only, through the real command line."""

import pytest
from hf_fixtures import ROOT, run_script

pytestmark = pytest.mark.slow  # the script in a subprocess


def run(*args):
    return run_script("count_params.py", *args, cwd=ROOT, env={"JAX_PLATFORMS": "cpu"}, timeout=300)


def test_lora_paper_counts(tmp_path):
    result = run("--config=experiments/lora_paper/param_counts.py", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| GPT", "| RoBERTa"))]
    expected = {
        # Table 2 (GLUE); the closed form is 2 matrices x layers x 2 r d.
        "RoBERTa-base, r=8, q+v": (f"{2 * 12 * 2 * 8 * 768:,}", "0.3M"),
        "RoBERTa-large, r=8, q+v": (f"{2 * 24 * 2 * 8 * 1024:,}", "0.8M"),
        "GPT-2 Medium, r=4, q+v": ("393,216", "0.35M"),
        "GPT-2 Large, r=4, q+v": ("737,280", "0.77M"),
        "GPT-3 175B, r=1, q+v": ("4,718,592", "4.7M"),
        "GPT-3 175B, r=8, q+v": ("37,748,736", "37.7M"),
    }
    assert len(rows) == 6
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        title, trainable, want, paper = cells[:4]
        assert (trainable, paper) == expected[title] and want == trainable
    # GPT-3 175B's total is its published size, so the real config was counted.
    assert rows[4].split("|")[5].strip().startswith("174,6")
    with open(tmp_path / "param_counts.md") as f:
        assert f.read().strip() == "\n".join(
            line for line in result.stdout.splitlines() if line.startswith("|")
        )


def test_bad_method_is_one_error_line():
    result = run(
        "--config=experiments/lora_paper/param_counts.py:gpt2_medium",
        "--config.settings.gpt2_medium.method.name=lroa",
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: method.name: unknown method 'lroa'; known: adalora, bitfit, dora, freeze, "
        "full, galore, ia3, loha, lokr, lora, oft, prefix_tuning, prompt_tuning, qlora, vera"
    ]


def test_every_method_has_a_closed_form_count():
    """experiments/methods/param_counts.py: one row per registered method on
    Llama-2-7B's shapes, each equal to its closed form (the script exits 1 on
    any row that differs)."""
    from ftjax.peft import known_methods

    result = run("--config=experiments/methods/param_counts.py")
    assert result.returncode == 0, result.stderr
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "methods_param_counts", f"{ROOT}/experiments/methods/param_counts.py"
    )
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    counted = {method["name"] for _, method, _ in config.SETTINGS.values()}
    missing = sorted(set(known_methods()) - counted)
    assert not missing, f"no closed-form count row for {missing}"
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(config.SETTINGS)
