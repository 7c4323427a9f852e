"""The GLUE configs (experiments/glue/roberta.py): the LoRA paper's settings,
and a run of each kind of task (pairs, regression, three classes with a
second eval split) through the same code path as the hub data, on local
stand-in files with GLUE's columns and a tiny RoBERTa."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
from hf_fixtures import ROOT, write_jsonl

from ftjax.errors import ConfigError


def _glue():
    spec = importlib.util.spec_from_file_location(
        "glue_roberta", os.path.join(ROOT, "experiments", "glue", "roberta.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GLUE = _glue()


def test_paper_settings():
    """Spot checks against the LoRA paper's Table 9 and the derived schedule."""
    cfg = GLUE.get_config("task=mrpc,size=base,method=lora")
    assert (cfg.method.name, cfg.method.rank, cfg.method.alpha, cfg.method.targets) == (
        "lora", 8, 8.0, "qv")  # fmt: skip
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.data.seq_len) == (4e-4, 16, 512)
    assert cfg.train.steps == -(-30 * 3_668 // 16)  # 30 epochs of MRPC's 3,668 pairs
    assert cfg.optim.warmup_steps == round(0.06 * cfg.train.steps)
    assert cfg.model.checkpoint == "FacebookAI/roberta-base"
    large = GLUE.get_config("task=stsb,size=large,method=lora")
    assert (large.optim.lr, large.data.batch_size, large.data.seq_len, large.method.alpha) == (
        2e-4, 4, 128, 16.0)  # fmt: skip
    assert (large.model.num_labels, large.data.label_kind) == (1, "regression")
    mnli = GLUE.get_config("task=mnli,method=full")
    assert mnli.method.name == "full" and mnli.model.num_labels == 3
    assert mnli.data.sources.mnli_validation_mismatched.weight == 0.0
    assert mnli.data.sources.mnli.hub == "nyu-mll/glue"


def test_bad_arg_is_refused():
    with pytest.raises(ConfigError, match="task='mrcp'; expected one of cola"):
        GLUE.get_config("task=mrcp")


ROWS = {
    "mrpc": lambda i: {
        "sentence1": f"the cat sat {i}",
        "sentence2": f"a cat sat {i}",
        "label": i % 2,
        "idx": i,
    },  # fmt: skip
    "stsb": lambda i: {
        "sentence1": f"a man plays {i}",
        "sentence2": f"a man sings {i}",
        "label": (i % 6) * 0.8,
        "idx": i,
    },  # fmt: skip
    "mnli": lambda i: {
        "premise": f"it rains {i}",
        "hypothesis": f"it is wet {i}",
        "label": i % 3,
        "idx": i,
    },  # fmt: skip
}


def _stand_in(root, task, splits):
    os.makedirs(os.path.join(root, task), exist_ok=True)
    for split in splits:
        write_jsonl(os.path.join(root, task, f"{split}.jsonl"), [ROWS[task](i) for i in range(24)])
    return str(root)


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,splits",
    [
        ("mrpc", ["train", "validation"]),
        ("stsb", ["train", "validation"]),
        ("mnli", ["train", "validation_matched", "validation_mismatched"]),
    ],  # fmt: skip
)
def test_local_stand_in_trains_through_the_hub_code_path(tmp_path, task, splits):
    from test_model_encoders import minilm_dir

    from ftjax.train import train

    local = _stand_in(tmp_path / "glue", task, splits)
    num_labels = GLUE.TASKS[task][2]
    cfg = GLUE.get_config(f"task={task},method=lora,local={local}")
    # A tiny random RoBERTa sized for an offline BERT tokenizer (two token types).
    cfg.model.checkpoint = ""
    cfg.model.init.update(model_type="roberta", vocab_size=30522, hidden_size=32,
                          intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=4,
                          max_position_embeddings=66, type_vocab_size=2, pad_token_id=0)  # fmt: skip
    cfg.data.update(tokenizer=minilm_dir(), seq_len=32, batch_size=8, eval_batch_size=16)
    cfg.train.update(steps=3, eval_every=3, checkpoint_every=3, log_every=1, tensorboard=False)
    cfg.optim.warmup_steps = 1
    summary = train(cfg, str(tmp_path / "run"), quiet=True).summary
    assert summary["skipped_updates"] == 0 and math.isfinite(summary["eval/loss"])
    metric = {"stsb": "pearson"}.get(task, "accuracy")
    assert 0 <= abs(summary[f"eval/{task}/{metric}"]) <= 1
    assert summary["data"]["label_kind"] == ("regression" if num_labels == 1 else "class")
    if task == "mnli":
        assert "eval/mnli_validation_mismatched/macro_f1" in summary
    if task == "mrpc":
        assert {"eval/mrpc/f1", "eval/mrpc/mcc"} <= set(summary)
