"""The LoRA paper's GLUE settings (Hu et al., 2021, Table 2 and Appendix D,
Table 9) for RoBERTa-base and RoBERTa-large, LoRA on query and value, with
full fine-tuning beside it.

    python scripts/train.py --config=experiments/glue/roberta.py:task=mrpc,size=base,method=lora \\
        --workdir=runs/glue/mrpc-base-lora
    python scripts/train.py --config=experiments/glue/roberta.py:task=rte,size=large,method=full \\
        --workdir=runs/glue/rte-large-full

`task` is one of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte; `size` base
or large; `method` lora (r=8 on q and v; alpha 8 for base, 16 for large) or
full. Data come from the hub (`nyu-mll/glue`, train and validation splits;
MNLI's validation_mismatched is a second, eval-only set); `local=DIR` reads
`DIR/<task>/train.jsonl` and `DIR/<task>/validation.jsonl` with the same
columns instead (what the tests use, offline). The classifier head trains
in full with every method (ftjax.peft.task_head), as in the paper.

What is reproduced and what is not (README, "GLUE"): the learning rates,
batch sizes, epochs, sequence lengths, warm-up ratio (0.06), linear decay,
AdamW and LoRA ranks/alphas below are the paper's. The paper's RoBERTa-large
LoRA runs on MRPC, RTE and STS-B start from the MNLI-adapted model (its
footnote); here every task starts from the pre-trained model. The paper
reports the median of 5 seeds; `seed=N` runs one. Full fine-tuning uses
RoBERTa's own GLUE recipe (Liu et al., 2019): lr 2e-5, batch 16 (base) or
32 (large), 10 epochs, warm-up 0.06.
"""

import math

from ftjax.errors import ConfigError
from ftjax.experiment import parse_arg, seed_everything, with_method
from ftjax.study.evaluate import default_eval_config
from ftjax.train import default_config

# Task -> (text field, pair field or "", num_labels, training examples, eval splits).
TASKS = {
    "cola": ("sentence", "", 2, 8_551, ("validation",)),
    "sst2": ("sentence", "", 2, 67_349, ("validation",)),
    "mrpc": ("sentence1", "sentence2", 2, 3_668, ("validation",)),
    "qqp": ("question1", "question2", 2, 363_846, ("validation",)),
    "stsb": ("sentence1", "sentence2", 1, 5_749, ("validation",)),
    "mnli": ("premise", "hypothesis", 3, 392_702, ("validation_matched", "validation_mismatched")),
    "qnli": ("question", "sentence", 2, 104_743, ("validation",)),
    "rte": ("sentence1", "sentence2", 2, 2_490, ("validation",)),
}
# The metric the paper reports per task (every set also gets accuracy / F1 / MCC
# or Pearson / Spearman: ftjax.eval.classification).
PAPER_METRIC = {"cola": "mcc", "stsb": "pearson"}

# LoRA paper, Table 9: (learning rate, batch size, epochs) per task.
LORA = {
    "base": dict(
        rank=8, alpha=8, seq_len=512,
        hparams={"mnli": (5e-4, 16, 30), "sst2": (5e-4, 16, 60), "mrpc": (4e-4, 16, 30),
                 "cola": (4e-4, 32, 80), "qnli": (4e-4, 32, 25), "qqp": (5e-4, 16, 25),
                 "rte": (5e-4, 32, 80), "stsb": (4e-4, 16, 40)},
    ),
    "large": dict(
        rank=8, alpha=16, seq_len=128,
        hparams={"mnli": (3e-4, 4, 10), "sst2": (4e-4, 4, 10), "mrpc": (3e-4, 4, 20),
                 "cola": (2e-4, 4, 20), "qnli": (2e-4, 4, 10), "qqp": (3e-4, 4, 20),
                 "rte": (4e-4, 4, 20), "stsb": (2e-4, 4, 30)},
    ),
}  # fmt: skip
FULL = {"base": dict(lr=2e-5, batch=16, epochs=10, seq_len=512),
        "large": dict(lr=2e-5, batch=32, epochs=10, seq_len=128)}  # fmt: skip
CHECKPOINTS = {"base": "FacebookAI/roberta-base", "large": "FacebookAI/roberta-large"}
WARMUP_RATIO = 0.06


def settings(task: str, size: str, method: str) -> dict:
    """lr, batch, epochs, seq_len (and rank, alpha for LoRA) of one run."""
    if method == "lora":
        lr, batch, epochs = LORA[size]["hparams"][task]
        return dict(lr=lr, batch=batch, epochs=epochs, seq_len=LORA[size]["seq_len"],
                    rank=LORA[size]["rank"], alpha=LORA[size]["alpha"])  # fmt: skip
    return dict(FULL[size])


def _choice(args: dict, key: str, default: str, allowed) -> str:
    value = args.pop(key, default)
    if value not in allowed:
        raise ConfigError(f"config arg {key}={value!r}; expected one of {', '.join(allowed)}")
    return value


def get_config(arg=None):
    args = parse_arg(arg)
    task = _choice(args, "task", "mrpc", TASKS)
    size = _choice(args, "size", "base", ("base", "large"))
    method = _choice(args, "method", "lora", ("lora", "full"))
    local = args.pop("local", "")
    seed = args.pop("seed", "0")
    if args:
        raise ConfigError(f"config arg: unknown key(s) {sorted(args)}; expected task, size, "
                          "method, local, seed")  # fmt: skip
    text, pair, num_labels, n_train, eval_splits = TASKS[task]
    s = settings(task, size, method)
    steps = math.ceil(s["epochs"] * n_train / s["batch"])

    cfg = default_config()
    cfg.model.update(checkpoint=CHECKPOINTS[size], task="sequence_classification",
                     num_labels=num_labels)  # fmt: skip
    fields = dict(text=text, text_pair=pair)
    if local:
        sources = {task: dict(path=f"{local}/{task}/train.jsonl",
                              eval_path=f"{local}/{task}/{eval_splits[0]}.jsonl")}  # fmt: skip
        extra = {f"{task}_{s}": dict(path=f"{local}/{task}/{s}.jsonl") for s in eval_splits[1:]}
    else:
        sources = {task: dict(hub="nyu-mll/glue", hub_config=task, split="train",
                              eval_split=eval_splits[0])}  # fmt: skip
        extra = {f"{task}_{s}": dict(hub="nyu-mll/glue", hub_config=task, split=s)
                 for s in eval_splits[1:]}  # fmt: skip
    for spec in extra.values():
        spec["weight"] = 0.0
    cfg.data.sources = {
        name: dict(format="classification", fields=fields, **spec)
        for name, spec in {**sources, **extra}.items()
    }
    cfg.data.update(tokenizer=CHECKPOINTS[size], seq_len=s["seq_len"], batch_size=s["batch"],
                    eval_batch_size=64, packing=False, eval_fraction=0.0,
                    label_kind="regression" if num_labels == 1 else "class")  # fmt: skip
    cfg.optim.update(lr=s["lr"], schedule="linear", warmup_steps=round(WARMUP_RATIO * steps),
                     weight_decay=0.01 if method == "full" else 0.0, clip_norm=0.0)  # fmt: skip
    cfg.train.update(steps=steps, eval_every=max(1, steps // s["epochs"]), log_every=100,
                     checkpoint_every=max(1, steps // s["epochs"]), keep=2,
                     best_metric=f"eval/{task}/{PAPER_METRIC.get(task, 'accuracy')}",
                     best_mode="max")  # fmt: skip
    cfg.eval = default_eval_config()
    cfg.eval.update(exact_match=False)
    options = {"rank": s["rank"], "alpha": s["alpha"], "targets": "qv"} if method == "lora" else {}
    with_method(cfg, method, options)
    cfg.optim.lr = s["lr"]  # the paper's rate, not the study preset's scaling
    seed_everything(cfg, seed)
    return cfg
