"""The LoRA paper's GPT-2 Medium E2E NLG setting (Hu et al. 2021, Table 11).

LoRA r=4, alpha=32 on the attention's q and v, dropout 0.1 on the adapter
input; AdamW lr 2e-4, weight decay 0.01, batch 8, 5 epochs, 500 warmup steps
then linear decay, label smoothing 0.1. Each example is E2E's meaning
representation (prompt, not trained on) followed by one human reference
(completion), one example per row (no packing, as in the paper's batches).

With a GPU, the hub model and the hub dataset (42,061 training examples ->
5 x 5,258 = 26,290 steps):

    python scripts/train.py --config=experiments/lora_paper/e2e.py --workdir=runs/e2e

writes the HF PEFT adapter to runs/e2e/adapter (393,216 trainable parameters,
the count the paper's released code gives; `scripts/count_params.py` checks it
without a GPU) and eval loss/perplexity on E2E's validation split to
runs/e2e/summary.json. The paper's headline numbers (BLEU 70.4, NIST 8.85,
METEOR 46.8, ROUGE-L 71.8, CIDEr 2.53 on the test set) are NOT computed by
ftjax: they need beam-search decoding (beam 10, length penalty 0.9, no-repeat
4-grams; ftjax generates greedily) and the official e2e-metrics scorer. Load
the adapter with `peft.PeftModel.from_pretrained("gpt2-medium", "runs/e2e/adapter")`
and decode with `transformers`' `generate(num_beams=10, ...)` for that.

Offline, on a local checkpoint directory (config.json, model.safetensors and
tokenizer files) and a local stand-in file with the hub dataset's fields
(`meaning_representation`, `human_reference`; JSON lines, csv or parquet):

    python scripts/train.py --workdir=/tmp/e2e \
        --config=experiments/lora_paper/e2e.py:local=1,checkpoint=/path/to/tiny,data=/path/e2e.jsonl

`data` may be left out: a synthetic stand-in (`write_standin`) is written to
the ftjax cache. Steps follow from the file's size (5 epochs of batches of 8);
`steps=N` overrides them (the tests run 3). Other arg keys: `eval_data` (a
local eval file; default: 5% carved from `data`), `dataset`/`eval_split` (hub
dataset id and its eval split), `tokenizer` (default: the checkpoint),
`epochs`, `seq_len`.

Differences from the paper's code, on purpose: GPT-2 fuses q, k, v into one
`c_attn` projection and ftjax (like HF PEFT) puts one rank-r adapter on it,
where loralib puts rank-r adapters on the q and v slices only. The parameter
count is the same (d*r + r*3d = 2 * (d*r + r*d)); the k slice is adapted too.
Sequences are padded to `seq_len` (128 covers E2E) rather than to the batch's
longest; gradients are not clipped, as in the paper's command.
"""

import json
import math
import os
import random

from ftjax.data import carve_eval, default_data_config, source_config
from ftjax.errors import ConfigError
from ftjax.experiment import cache_dir, parse_arg, with_method
from ftjax.train import default_config

HUB_MODEL = "gpt2-medium"
HUB_DATASET = "e2e_nlg"
# Rows of E2E's train split on the hub: the paper's 5 epochs of batch 8 are
# 5 * ceil(42061 / 8) = 26,290 steps.
HUB_TRAIN_EXAMPLES = 42061
FIELDS = dict(prompt="meaning_representation", completion="human_reference")
PAPER = dict(rank=4, alpha=32.0, dropout=0.1, lr=2e-4, weight_decay=0.01, batch_size=8,
             epochs=5, warmup_steps=500, label_smoothing=0.1)  # fmt: skip


def count_rows(path: str) -> int:
    """Training rows of a local file, without `datasets` (get_config runs at
    flag-parsing time): non-blank lines of JSON lines, rows of csv/parquet."""
    if not os.path.isfile(path):
        raise ConfigError(f"config arg data={path!r}: no such file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, encoding="utf-8") as f:
        lines = sum(1 for line in f if line.strip())
    return lines - 1 if suffix == ".csv" else lines  # csv: minus the header


def write_standin(path: str, n: int = 400, seed: int = 0) -> str:
    """A synthetic E2E-like JSON-lines file: a restaurant's attribute list and
    a templated one-sentence description, in E2E's field names and character
    set (ASCII letters, digits and punctuation), for runs without the hub."""
    rng = random.Random(seed)
    names = ["The Eagle", "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Cotto",
             "Fitzbillies", "Giraffe", "Loch Fyne", "The Mill", "Zizzi", "Strada"]  # fmt: skip
    foods = ["French", "Italian", "Chinese", "Indian", "English", "Japanese", "Fast food"]
    kinds = ["restaurant", "pub", "coffee shop"]
    areas = ["city centre", "riverside"]
    prices = ["cheap", "moderate", "high"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            name, food, kind = rng.choice(names), rng.choice(foods), rng.choice(kinds)
            area, price = rng.choice(areas), rng.choice(prices)
            mr = f"name[{name}], eatType[{kind}], food[{food}], priceRange[{price}], area[{area}]"
            dish = food if food.endswith("food") else f"{food} food"
            ref = rng.choice([
                f"{name} is a {price} {food} {kind} in the {area} area.",
                f"In the {area} there is a {kind} called {name} serving {price} {dish}.",
                f"{name} serves {dish} at {price} prices; it is a {kind} in the {area} area.",
            ])  # fmt: skip
            f.write(json.dumps({"meaning_representation": mr, "human_reference": ref}) + "\n")
    return path


def get_config(arg=None):
    args = parse_arg(arg)
    local = args.pop("local", "0").lower() in ("1", "true", "yes")
    checkpoint = args.pop("checkpoint", "" if local else HUB_MODEL)
    tokenizer = args.pop("tokenizer", checkpoint)
    data = args.pop("data", "")
    eval_data = args.pop("eval_data", "")
    dataset = args.pop("dataset", "" if local or data else HUB_DATASET)
    eval_split = args.pop("eval_split", "validation")
    epochs = float(args.pop("epochs", PAPER["epochs"]))
    steps = int(args.pop("steps", "0"))
    seq_len = int(args.pop("seq_len", "128"))
    if args:
        raise ConfigError(f"config arg: unknown key(s) {sorted(args)} for the E2E config")
    if local and not checkpoint:
        raise ConfigError(
            "config arg local=1 needs checkpoint=DIR (a local HF checkpoint with tokenizer files)"
        )

    cfg = default_config()
    cfg.model.checkpoint = checkpoint
    cfg.data = default_data_config()
    cfg.data.update(tokenizer=tokenizer, seq_len=seq_len, batch_size=PAPER["batch_size"],
                    packing=False, max_eval_examples=0)  # fmt: skip
    if dataset:
        cfg.data.sources.e2e = source_config(
            hub=dataset, split="train", eval_split=eval_split, format="prompt_completion", **FIELDS
        )
        n_train = HUB_TRAIN_EXAMPLES if dataset == HUB_DATASET else 0
    else:
        if not data:
            data = os.path.join(cache_dir(), "e2e_standin", "train.jsonl")
            if not os.path.exists(data):
                # Written aside and renamed: a concurrent run never reads half a file.
                tmp = f"{data}.tmp{os.getpid()}"
                os.replace(write_standin(tmp), data)
        cfg.data.sources.e2e = source_config(
            data, eval_path=eval_data, format="prompt_completion", **FIELDS
        )
        n_rows = count_rows(data)
        # The eval split is carved from the training file when there is no
        # eval file: count only the rows that train.
        n_train = n_rows if eval_data else len(carve_eval(n_rows, cfg.data.eval_fraction,
                                                           cfg.data.seed, "e2e")[0])  # fmt: skip
    if not steps:
        if not n_train:
            raise ConfigError(
                f"config arg dataset={dataset!r}: its size is unknown here; give steps=N"
            )
        # Epochs -> steps: one example per row (no packing), so an epoch is
        # ceil(examples / batch) steps (examples dropped as empty are not
        # subtracted; E2E has none).
        steps = int(math.ceil(epochs * math.ceil(n_train / PAPER["batch_size"])))

    with_method(cfg, "lora", dict(rank=PAPER["rank"], alpha=PAPER["alpha"],
                                  dropout=PAPER["dropout"], targets="qv"))  # fmt: skip
    cfg.optim.update(name="adamw", lr=PAPER["lr"], weight_decay=PAPER["weight_decay"],
                     schedule="linear", end_lr_fraction=0.0,
                     # A short smoke run (steps=N below the paper's warm-up) warms up for all of it.
                     warmup_steps=min(PAPER["warmup_steps"], steps),
                     b1=0.9, b2=0.999, clip_norm=0.0)  # fmt: skip
    cfg.train.update(steps=steps, label_smoothing=PAPER["label_smoothing"], log_every=100,
                     checkpoint_every=1000, keep=2)  # fmt: skip
    if steps < 100:
        cfg.train.log_every = 1
    return cfg
