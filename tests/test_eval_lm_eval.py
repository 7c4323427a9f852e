"""The lm-evaluation-harness adapter: its three request types against numpy and
ftjax's own scorers, and a local custom task run end to end from Python and
from the harness command line (offline: YAML plus a local JSON file)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from hf_fixtures import char_tokenizer, log_probs64, tiny_model

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from ftjax.eval import generate, score_multiple_choice  # noqa: E402
from ftjax.eval.lm_eval_adapter import FtjaxLM, main  # noqa: E402
from ftjax.models import save_pretrained  # noqa: E402

ITEMS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0, "answer": "blue"},
    {"question": "Two plus two is", "choices": ["four", "five"], "label": 0, "answer": "four"},
    {"question": "Fire is", "choices": ["cold", "hot", "wet"], "label": 1, "answer": "hot"},
    {"question": "Ice is", "choices": ["cold", "hot"], "label": 0, "answer": "cold"},
    {"question": "Q: 1+1?\nA:", "choices": ["2", "3", "11"], "label": 0, "answer": "2"},
]


@pytest.fixture(scope="module")
def lm():
    model, params = tiny_model("llama")
    return FtjaxLM(model=model, params=params, tokenizer=char_tokenizer(), batch_size=4)


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_loglikelihood_matches_numpy(lm):
    tok = lm.tokenizer
    pairs = [("The sky is", " blue"), ("Ice is ", "cold"), ("", "hello")]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (ll, greedy) in zip(pairs, got, strict=True):
        ctx = tok.encode(context.rstrip(" ")) or [tok.eos_token_id]  # empty: condition on EOS
        seq = ctx + tok.encode(context[len(context.rstrip(" ")) :] + continuation)
        logp = log_probs64(lm.model, lm.params, seq[:-1])
        rows = range(len(ctx) - 1, len(seq) - 1)
        np.testing.assert_allclose(ll, sum(logp[t, seq[t + 1]] for t in rows), rtol=1e-5, atol=1e-4)
        assert greedy == all(logp[t].argmax() == seq[t + 1] for t in rows)


def test_loglikelihood_rolling_matches_numpy(lm):
    text = "A short document, scored whole."
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    seq = [lm.tokenizer.eos_token_id] + lm.tokenizer.encode(text)
    logp = log_probs64(lm.model, lm.params, seq[:-1])
    want = sum(logp[t, seq[t + 1]] for t in range(len(seq) - 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_generate_until_cuts_at_stop_strings(lm):
    prompt = "Q: what?\nA:"
    ids = lm.tokenizer.encode(prompt)
    free = generate(lm.model, lm.params, [ids] * 4, max_new_tokens=12, stop_tokens=[0])
    free = free.sequences()[0]
    text = lm.tokenizer.decode(free)
    stop = text[len(text) // 2]  # a character the greedy continuation does produce
    got = lm.generate_until(
        [
            _req(
                "generate_until", prompt, {"until": [stop], "max_gen_toks": 12, "do_sample": False}
            ),
            _req("generate_until", prompt, {"until": ["\x7f"], "max_gen_toks": 5}),
        ]
    )
    assert got[0] == text[: text.index(stop)]
    assert got[1] == lm.tokenizer.decode(free[:5])


def _write_tasks(root):
    data = os.path.join(root, "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in ITEMS)
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    )
    with open(os.path.join(root, "mc.yaml"), "w") as f:
        f.write(
            "task: ftjax_tiny_mc\n" + common + "output_type: multiple_choice\n"
            'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        )
    with open(os.path.join(root, "gen.yaml"), "w") as f:
        f.write(
            "task: ftjax_tiny_gen\n" + common + "output_type: generate_until\n"
            'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
            'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
            "metric_list:\n  - metric: exact_match\n"
        )


def test_custom_task_end_to_end_from_python(lm, tmp_path):
    _write_tasks(str(tmp_path))
    results = simple_evaluate(
        model=lm,
        tasks=["ftjax_tiny_mc", "ftjax_tiny_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )["results"]
    # The harness joins question and choice with its target delimiter, " ".
    ours = score_multiple_choice(
        lm.model,
        lm.params,
        lm.tokenizer,
        [
            {
                "context": i["question"],
                "choices": [" " + c for c in i["choices"]],
                "label": i["label"],
            }
            for i in ITEMS
        ],
    )
    assert results["ftjax_tiny_mc"]["acc,none"] == pytest.approx(ours["acc"])
    assert 0.0 <= results["ftjax_tiny_mc"]["acc_norm,none"] <= 1.0
    assert results["ftjax_tiny_gen"]["exact_match,none"] == 0.0  # a random model says no answers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny model saved as a Hugging Face checkpoint with its tokenizer."""
    model, params = tiny_model("llama")
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    save_pretrained(model, params, ckpt)
    char_tokenizer().save_pretrained(ckpt)
    return ckpt


def test_peft_adapter_from_a_directory(lm, checkpoint, tmp_path):
    peft = pytest.importorskip("ftjax.peft")
    method = peft.build_method({"name": "lora", "rank": 4, "alpha": 8, "targets": "qv"})
    adapted = method.apply(lm.params, jax.random.key(0))
    # Non-zero `b`, so that the adapter changes the model.
    adapted = jax.tree.map(
        lambda x: (
            x.replace(b=np.full(x.b.shape, 0.3, np.float32))
            if isinstance(x, peft.LoraWeight)
            else x
        ),
        adapted,
        is_leaf=lambda x: isinstance(x, peft.LoraWeight),
    )
    peft.save_adapter(lm.model.cfg, adapted, str(tmp_path), method=method)
    from_dir = FtjaxLM(checkpoint, adapter=str(tmp_path), batch_size=4)
    in_memory = FtjaxLM(model=lm.model, params=adapted, tokenizer=lm.tokenizer, batch_size=4)
    request = [_req("loglikelihood", "The sky is", " blue")]
    got = from_dir.loglikelihood(request)[0][0]
    assert got == pytest.approx(in_memory.loglikelihood(request)[0][0], abs=1e-4)
    assert abs(got - lm.loglikelihood(request)[0][0]) > 1e-3


@pytest.mark.slow
def test_harness_command_line(checkpoint, tmp_path, monkeypatch):
    """`python -m ftjax.eval.lm_eval_adapter ARGS` is the harness's command line
    with `ftjax` registered. The run itself is in-process (main() with ARGS as
    sys.argv) to spare a second JAX start-up; a subprocess checks the -m entry."""
    model, params = tiny_model("llama")
    ckpt = checkpoint
    _write_tasks(str(tmp_path))
    out = tmp_path / "out"
    args = [
        "--model", "ftjax",
        "--model_args", f"path={ckpt}",
        "--batch_size", "4",
        "--tasks", "ftjax_tiny_mc",
        "--include_path", str(tmp_path),
        "--output_path", str(out),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["lm_eval", *args])
    main()
    written = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".json")]
    result = json.load(open(written[0]))["results"]["ftjax_tiny_mc"]
    ours = score_multiple_choice(
        model,
        params,
        char_tokenizer(),
        [
            {
                "context": i["question"],
                "choices": [" " + c for c in i["choices"]],
                "label": i["label"],
            }
            for i in ITEMS
        ],
    )
    assert result["acc,none"] == pytest.approx(ours["acc"])
    proc = subprocess.run(
        [sys.executable, "-m", "ftjax.eval.lm_eval_adapter", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--model_args" in proc.stdout, proc.stderr[-2000:]
