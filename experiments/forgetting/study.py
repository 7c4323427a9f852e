"""The built-in forgetting study: full fine-tuning against PEFT methods on a
task the base model cannot do, measuring what each learns and forgets.

A tiny Llama-architecture model is first pre-trained from scratch on the
synthetic suite's "general" tasks (copy, reverse, sort, addition, key-value
lookup); each method then fine-tunes it on the "target" task (a rot-3 cipher)
with the same data, steps and schedule. Exact-match accuracy on held-out
target and general prompts, before and after, gives learning and forgetting.

    python scripts/sweep.py --config=experiments/forgetting/study.py --workdir=runs/forgetting
    python scripts/report.py --workdir=runs/forgetting

One run by hand (after the base exists):
    python scripts/train.py \
        --config=experiments/forgetting/study.py:method=lora,rank=4 --workdir=runs/one

`quick=1` in the arg shrinks everything to a seconds-long end-to-end check (the
test suite runs it). Expected on a 2-core CPU: the whole sweep in about ten
minutes; see README for the numbers.
"""

from ftjax.data import suite_data_config
from ftjax.experiment import (
    default_eval_config,
    ensure_suite,
    parse_arg,
    split_method_options,
    with_method,
)
from ftjax.sweep import product
from ftjax.train import default_config
from ftjax.train.optim import ConfigError

FULL = dict(
    suite=dict(general_train=20000, general_eval=200, target_train=4000, target_eval=200),
    model=dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2),
    pretrain_steps=1500,
    finetune_steps=150,
    batch_size=32,
)
QUICK = dict(
    suite=dict(general_train=600, general_eval=24, target_train=200, target_eval=24),
    model=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
    pretrain_steps=12,
    finetune_steps=6,
    batch_size=8,
)


def get_config(arg=None):
    args = parse_arg(arg)
    stage = args.pop("stage", "finetune")
    size = QUICK if args.pop("quick", "0") in ("1", "true") else FULL
    method = args.pop("method", "full")
    method_options, rest = split_method_options(args)
    if rest:
        raise ConfigError(f"config arg: unknown key(s) {sorted(rest)} for the forgetting study")
    if stage not in ("pretrain", "finetune"):
        raise ConfigError(f"config arg stage={stage!r}; expected pretrain or finetune")

    paths, tokenizer = ensure_suite(seed=0, **size["suite"])
    cfg = default_config()
    cfg.model.init.update(vocab_size=128, max_position_embeddings=128, **size["model"])
    cfg.optim.update(lr=3e-4, warmup_steps=20, schedule="cosine", weight_decay=0.01, clip_norm=1.0)
    cfg.train.update(log_every=10, keep=1)
    cfg.eval = default_eval_config()
    cfg.eval.max_new_tokens = 36
    cfg.study = dict(name="forgetting", stage=stage, manifest=paths["manifest"])
    if size is QUICK:
        cfg.train.log_every = 2
        cfg.optim.warmup_steps = 2
        cfg.eval.max_examples = 8
        cfg.eval.max_new_tokens = 8
    if stage == "pretrain":
        # The base model: full training from scratch on the general tasks only;
        # the target task stays eval-only (the base must not know it).
        cfg.data = suite_data_config(paths, tokenizer, general_weight=1.0, target_weight=0.0)
        cfg.optim.update(lr=3e-3, warmup_steps=min(100, size["pretrain_steps"] // 4))
        cfg.train.steps = size["pretrain_steps"]
        cfg.train.export_hf = True
        cfg.eval.analysis = False
        with_method(cfg, "full")
    else:
        cfg.data = suite_data_config(paths, tokenizer, general_weight=0.0, target_weight=1.0)
        cfg.model.checkpoint = "{sweep_dir}/base/hf"
        cfg.train.steps = size["finetune_steps"]
        with_method(cfg, method, method_options)
    cfg.data.batch_size = size["batch_size"]
    cfg.data.max_eval_examples = size["suite"]["target_eval"]
    return cfg


def get_prerequisites():
    return [("base", "stage=pretrain")]


def get_sweep(arg=None):
    if "quick=1" in (arg or ""):
        # The end-to-end test: a few methods, two seeds for one of them.
        return [
            {"arg": "method=full", "train.seed": 0},
            {"arg": "method=full", "train.seed": 1},
            {"arg": "method=lora,rank=4", "train.seed": 0},
            {"arg": "method=qlora,rank=4", "train.seed": 0},
        ]
    methods = [
        "method=full",
        "method=lora,rank=4",
        "method=lora,rank=16",
        "method=lora,rank=16,targets=qv",
        "method=dora,rank=16",
        "method=qlora,rank=16",
        "method=pissa,rank=16",
        "method=bitfit",
        "method=freeze,last_layers=1",
    ]
    # Every method once; the two the comparison hinges on with a second seed.
    return product(arg=methods, **{"train.seed": [0]}) + product(
        arg=["method=full", "method=lora,rank=16"], **{"train.seed": [1]}
    )
