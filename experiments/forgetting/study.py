"""The built-in forgetting study: full fine-tuning against PEFT methods on a
task the base model cannot do, each method at its own selected learning
rate, measuring what each learns and forgets along training.

A small Llama-architecture model (hidden size 256, so LoRA ranks 1-64 are at
most a quarter of it) is first pre-trained from scratch on the synthetic
suite's general tasks (copy, reverse, sort, addition). Every method then
fine-tunes it on the target task with the same data, steps and schedule:

1. selection: each row runs its own learning-rate grid (seed 0); the choice
   maximizes exact match on `target_val`, a validation split of the target
   task disjoint from its test prompts (ties: the lower validation loss);
2. finals: seeds 1 and 2 at the chosen rate (the chosen grid run is seed 0).

Along training (every `train.eval_every` steps) each run records target and
general exact match on the first `eval.curve_examples` prompts of each set:
the learning and forgetting curves, and forgetting at matched learning.

    python scripts/sweep.py --config=experiments/forgetting/study.py --workdir=runs/forgetting --jobs=2
    python scripts/report.py --workdir=runs/forgetting

One run by hand (after the base exists):
    python scripts/train.py \\
        --config=experiments/forgetting/study.py:method=lora,rank=4 --workdir=runs/one

`quick=1` in the arg shrinks everything to a seconds-long end-to-end check (the
test suite runs it). Design choices, what was tried, measured wall time and
results: README, "Forgetting".
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

TARGET_TASK = "flip"
GENERAL_TASKS = "copy,reverse,sort,add"
FULL = dict(
    suite=dict(
        general_train=20000, general_eval=200, target_train=4000, target_eval=200, target_val=100
    ),  # fmt: skip
    model=dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2),
    pretrain_steps=1200,
    pretrain_batch_size=32,
    finetune_steps=72,
    batch_size=32,
    eval_examples=200,
    eval_every=16,
    curve_examples=32,
)
QUICK = dict(
    suite=dict(
        general_train=600, general_eval=24, target_train=200, target_eval=24, target_val=16
    ),  # fmt: skip
    model=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
    pretrain_steps=12,
    pretrain_batch_size=8,
    finetune_steps=6,
    batch_size=8,
    eval_examples=8,
    eval_every=3,
    curve_examples=8,
)

# Every row: its method arg and its own learning-rate grid (each grid spans
# the rates where the method goes from learning too slowly to diverging).
ROWS = {
    "full": ("method=full", [3e-4, 1e-3, 3e-3]),
    "full + 10% replay": ("method=full,replay=0.1", [3e-4, 1e-3, 3e-3]),
    "lora r=1": ("method=lora,rank=1", [3e-3, 1e-2, 3e-2]),
    "lora r=4": ("method=lora,rank=4", [1e-3, 3e-3, 1e-2]),
    "lora r=16": ("method=lora,rank=16", [3e-3, 1e-2, 3e-2]),
    "lora r=64": ("method=lora,rank=64", [1e-3, 3e-3, 1e-2]),
    "rslora r=64": ("method=lora,rank=64,rslora=1", [1e-3, 3e-3, 1e-2]),
    "dora r=16": ("method=dora,rank=16", [1e-3, 3e-3, 1e-2]),
    "qlora r=16": ("method=qlora,rank=16", [3e-3, 1e-2, 3e-2]),
    "bitfit": ("method=bitfit", [3e-2, 1e-1, 3e-1]),
    "freeze all but last layer": ("method=freeze,last_layers=1", [1e-3, 3e-3, 1e-2]),
}
QUICK_ROWS = {
    "full": ("method=full", [1e-3, 3e-3]),
    "lora r=4": ("method=lora,rank=4", [3e-3]),
    "qlora r=4": ("method=qlora,rank=4", [3e-3]),
}
# What the study exists to compare (the report tests each difference at 95%).
COMPARISONS = [
    ("full", "lora r=1"),
    ("full", "lora r=4"),
    ("full", "lora r=16"),
    ("full", "lora r=64"),
    ("rslora r=64", "lora r=64"),
    ("full + 10% replay", "full"),
    ("qlora r=16", "lora r=16"),
]


def _is_quick(args: dict) -> bool:
    return args.pop("quick", "0") in ("1", "true")


def get_config(arg=None):
    args = parse_arg(arg)
    stage = args.pop("stage", "finetune")
    size = QUICK if _is_quick(args) else FULL
    method = args.pop("method", "full")
    replay = float(args.pop("replay", "0"))
    seed = args.pop("seed", "0")
    method_options, rest = split_method_options(args)
    if rest:
        raise ConfigError(f"config arg: unknown key(s) {sorted(rest)} for the forgetting study")
    if stage not in ("pretrain", "finetune"):
        raise ConfigError(f"config arg stage={stage!r}; expected pretrain or finetune")
    if not 0.0 <= replay < 1.0:
        raise ConfigError(f"config arg replay={replay}; expected a fraction in [0, 1)")

    paths, tokenizer = ensure_suite(
        seed=0, target_task=TARGET_TASK, general_tasks=GENERAL_TASKS, **size["suite"]
    )
    cfg = suite_study_config(size["model"])
    cfg.train.update(log_every=10, keep=1)
    cfg.eval.max_new_tokens = 16
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
        if replay:
            cfg.study.label = f"{method} + {replay:.0%} replay"
        cfg.model.checkpoint = "{sweep_dir}/base/hf"
        cfg.train.steps = size["finetune_steps"]
        cfg.train.eval_every = size["eval_every"]
        # Losses along training on the first batches of each eval set only: the
        # final metrics are measured again on the whole sets after training
        # (ftjax.study.evaluate), so this changes no number of the report and
        # takes about a tenth of the study's time off.
        cfg.train.eval_max_batches = 2
        cfg.eval.curve_examples = size["curve_examples"]
        with_method(cfg, method, method_options)
        seed_everything(cfg, seed)
    cfg.data.batch_size = size["pretrain_batch_size" if stage == "pretrain" else "batch_size"]
    cfg.data.max_eval_examples = size["suite"]["target_eval"]
    cfg.eval.max_examples = size["eval_examples"]
    return cfg


def get_prerequisites():
    return [("base", "stage=pretrain")]


def get_selection(arg=None):
    quick = _is_quick(parse_arg(arg))
    rows = QUICK_ROWS if quick else ROWS
    return dict(
        rows={label: dict(arg=a, grid={"optim.lr": lrs}) for label, (a, lrs) in rows.items()},
        seeds=[0, 1] if quick else [0, 1, 2],
        rule=dict(maximize="final/target_val/exact_match", then_minimize="final/target_val/loss"),
        comparisons=[("full", "lora r=4")] if quick else COMPARISONS,
    )
