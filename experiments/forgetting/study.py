"""The built-in forgetting study: full fine-tuning against PEFT methods on a
task the base model cannot do, measuring what each learns and forgets.

A tiny Llama-architecture model is first pre-trained from scratch on the
synthetic suite's "general" tasks (copy, reverse, sort, addition, key-value
lookup); each method then fine-tunes it on the "target" task (a rot-3 cipher)
with the same data, steps and schedule. Exact-match accuracy on held-out
target and general prompts, before and after, gives learning and forgetting.

    python scripts/sweep.py --config=experiments/forgetting/study.py --workdir=runs/forgetting --jobs=2
    python scripts/report.py --workdir=runs/forgetting

One run by hand (after the base exists):
    python scripts/train.py \
        --config=experiments/forgetting/study.py:method=lora,rank=4 --workdir=runs/one

Learning-rate grid (`:lr_grid=1`, seed 0, 100 fine-tuning steps; target exact
match / general exact match after / general loss increase; base: general 0.90,
target 0.00), measured on a shared 2-core CPU on 2026-11-28:

    full         1e-4: 0.00 / 0.30 / 1.03   3e-4: 0.15 / 0.19 / 2.00
                 1e-3: 1.00 / 0.16 / 6.06*  3e-3: 1.00 / 0.00 / 7.68
    lora r=16    1e-3: 0.00 / 0.10 / 2.25   3e-3: 0.61 / 0.06 / 4.24*
                 1e-2: 0.00 / 0.00 / 4.41   3e-2: 0.00 / 0.00 / 3.97
    lora qv r=8  3e-3: 0.00 / 0.00 / 2.97*  1e-2: 0.00 / 0.00 / 4.15  3e-2: 0.00 / 0.00 / 4.10
    rslora r=64  1e-3: 1.00 / 0.05 / 6.57*  3e-3: 1.00 / 0.00 / 8.23  1e-2: 0.00 / 0.00 / 4.02
    bitfit       1e-2: 0.00 / 0.06 / 2.06*  3e-2: 0.00 / 0.02 / 2.84  1e-1: 0.00 / 0.00 / 3.26
    freeze       3e-4: 0.00 / 0.77 / 0.46*  1e-3: 0.00 / 0.14 / 2.57  3e-3: 0.00 / 0.00 / 3.19

(* chosen.) The other LoRA variants share LoRA r=16's rate; full + replay
shares full's. Above the best rate, adapters collapse (0 on both sets).

`quick=1` in the arg shrinks everything to a seconds-long end-to-end check (the
test suite runs it). Measured wall time and results: README, "Forgetting".
"""

from ftjax.data import suite_data_config
from ftjax.errors import ConfigError
from ftjax.experiment import (
    ensure_suite,
    parse_arg,
    pretrain_on_general,
    seed_everything,
    split_method_options,
    suite_study_config,
    with_method,
)

FULL = dict(
    suite=dict(general_train=20000, general_eval=200, target_train=4000, target_eval=200),
    model=dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2),
    pretrain_steps=1500,
    finetune_steps=100,
    batch_size=32,
    eval_examples=100,
)
QUICK = dict(
    suite=dict(general_train=600, general_eval=24, target_train=200, target_eval=24),
    model=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
    pretrain_steps=12,
    finetune_steps=6,
    batch_size=8,
    eval_examples=8,
)

# Each method at its best learning rate on the grid below (highest target exact
# match after fine-tuning, seed 0; ties broken by the smaller general-loss
# increase), as measured by
#   python scripts/sweep.py --config=experiments/forgetting/study.py:lr_grid=1 \
#       --workdir=runs/forgetting-lr && python scripts/report.py --workdir=runs/forgetting-lr
# (results in the module docstring). Same tokens, steps and schedule for all.
METHODS = {
    "full": ("method=full", 1e-3),
    "lora r=1": ("method=lora,rank=1", 3e-3),
    "lora r=4": ("method=lora,rank=4", 3e-3),
    "lora r=16": ("method=lora,rank=16", 3e-3),
    "lora r=64": ("method=lora,rank=64", 3e-3),
    "lora qv r=8": ("method=lora,rank=8,targets=qv", 3e-3),
    "rslora r=64": ("method=lora,rank=64,rslora=1", 1e-3),
    "dora r=16": ("method=dora,rank=16", 3e-3),
    "qlora r=16": ("method=qlora,rank=16", 3e-3),
    "bitfit": ("method=bitfit", 1e-2),
    "freeze all but last layer": ("method=freeze,last_layers=1", 3e-4),
    "full + 10% replay": ("method=full,replay=0.1", 1e-3),
}
# The documented learning-rate sweep: one 3-point grid per method family (the
# other LoRA variants — ranks 1/4/64, DoRA, QLoRA — share LoRA r=16's best;
# full + replay shares full's).
LR_GRID = {
    "full": [3e-4, 1e-3, 3e-3],
    "lora r=16": [1e-3, 3e-3, 1e-2],
    "lora qv r=8": [3e-3, 1e-2, 3e-2],
    "rslora r=64": [1e-3, 3e-3, 1e-2],
    "bitfit": [1e-2, 3e-2, 1e-1],
    "freeze all but last layer": [3e-4, 1e-3, 3e-3],
}


def get_config(arg=None):
    args = parse_arg(arg)
    stage = args.pop("stage", "finetune")
    size = QUICK if args.pop("quick", "0") in ("1", "true") else FULL
    method = args.pop("method", "full")
    replay = float(args.pop("replay", "0"))
    seed = args.pop("seed", "0")
    args.pop("lr_grid", None)  # a sweep switch, not a run setting
    method_options, rest = split_method_options(args)
    if rest:
        raise ConfigError(f"config arg: unknown key(s) {sorted(rest)} for the forgetting study")
    if stage not in ("pretrain", "finetune"):
        raise ConfigError(f"config arg stage={stage!r}; expected pretrain or finetune")

    paths, tokenizer = ensure_suite(seed=0, **size["suite"])
    cfg = suite_study_config(size["model"])
    cfg.train.update(log_every=10, keep=1)
    cfg.eval.max_new_tokens = 36
    cfg.study = dict(name="forgetting", stage=stage, manifest=paths["manifest"], label="")
    if size is QUICK:
        cfg.train.log_every = 2
        cfg.optim.warmup_steps = 2
        cfg.eval.max_new_tokens = 8
    if stage == "pretrain":
        pretrain_on_general(cfg, paths, tokenizer, size["pretrain_steps"], max_warmup=100)
    else:
        # General data is eval-only (it measures forgetting), except with replay:
        # then that share of every batch comes from the general tasks.
        cfg.data = suite_data_config(
            paths, tokenizer, general_weight=replay, target_weight=1.0 - replay
        )
        if not 0.0 <= replay < 1.0:
            raise ConfigError(f"config arg replay={replay}; expected a fraction in [0, 1)")
        if replay:
            cfg.study.label = f"{method} + {replay:.0%} replay"
        cfg.model.checkpoint = "{sweep_dir}/base/hf"
        cfg.train.steps = size["finetune_steps"]
        with_method(cfg, method, method_options)
    cfg.data.batch_size = size["batch_size"]
    cfg.data.max_eval_examples = size["suite"]["target_eval"]
    if stage == "finetune":
        seed_everything(cfg, seed)
    cfg.eval.max_examples = size["eval_examples"]
    return cfg


def get_prerequisites():
    return [("base", "stage=pretrain")]


def get_sweep(arg=None):
    args = parse_arg(arg)
    if args.get("quick") in ("1", "true"):
        # The end-to-end test: a few methods, two seeds for one of them.
        return [
            {"arg": "method=full,seed=0"},
            {"arg": "method=full,seed=1"},
            {"arg": "method=lora,rank=4,seed=0"},
            {"arg": "method=qlora,rank=4,seed=0"},
        ]
    if args.get("lr_grid") in ("1", "true"):
        return [
            {"arg": METHODS[label][0], "optim.lr": lr}
            for label, grid in LR_GRID.items()
            for lr in grid
        ]
    return [
        {"arg": f"{method_arg},seed={seed}", "optim.lr": lr}
        for seed in (0, 1)
        for method_arg, lr in METHODS.values()
    ]
