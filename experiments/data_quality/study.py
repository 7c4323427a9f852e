"""The data-quality study: what full fine-tuning and LoRA do with corrupted labels.

One base model is pre-trained once, on a clean copy of the synthetic suite's
"general" tasks. Full fine-tuning and LoRA (r=16, all-linear) then fine-tune
it on the target task (`op:a#b=` -> (a + 2b) mod 10) with 0%, 20% and 50% of
the target training labels replaced by a plausible wrong answer (off by 1-3).
Every run sees the same steps, batches and schedule; only the labels differ.

The report gives, per method and noise rate:
  target        exact match on held-out (clean) target prompts
  forgetting    drop in exact match on held-out general prompts
  memorized_wrong      on the corrupted training prompts (the first 80), the share
                       where the model now answers the wrong label it was trained on
  corrupted_recovered  ... the share where it answers the true label anyway

    python scripts/sweep.py --config=experiments/data_quality/study.py --workdir=runs/data_quality \
        --jobs=2
    python scripts/report.py --workdir=runs/data_quality

One run by hand (after the base exists in runs/data_quality/base):
    python scripts/train.py --config=experiments/data_quality/study.py:method=lora,noise=0.5 \
        --config.model.checkpoint=runs/data_quality/base/hf --workdir=runs/dq-one

Three seeds per cell (`seed=` in the arg sets the data order and adapter
initialization); the report's intervals are over them. Measured wall time and
the result table: README, "Data quality".

`quick=1` in the arg is a seconds-long end-to-end check (tests/test_studies.py
runs it).

The target task is `modop` rather than the forgetting study's rot cipher: its
one-digit answers are learned within a few hundred steps by a model this
small, so that the clean run reaches a high accuracy and the noisy runs have
something to lose. The target training set is small (many epochs per run) on
purpose: memorizing individual wrong labels needs repeated exposure.
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

NOISE_RATES = (0.0, 0.2, 0.5)
SEEDS = (0, 1, 2)
FULL = dict(
    suite=dict(
        general_train=8000, general_eval=80, target_train=1000, target_eval=80, target_task="modop"
    ),
    model=dict(hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2),
    pretrain_steps=500,
    pretrain_batch_size=32,
    finetune_steps=400,
    batch_size=16,
    eval_examples=80,
)
QUICK = dict(
    suite=dict(
        general_train=300, general_eval=16, target_train=80, target_eval=16, target_task="modop"
    ),
    model=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
    pretrain_steps=8,
    pretrain_batch_size=8,
    finetune_steps=6,
    batch_size=8,
    eval_examples=8,
)


def _noise(value: str) -> float:
    try:
        noise = float(value)
    except ValueError:
        raise ConfigError(f"config arg noise={value!r}; expected a rate in [0, 1)") from None
    if not 0 <= noise < 1:
        raise ConfigError(f"config arg noise={value!r}; expected a rate in [0, 1)")
    return noise


def get_config(arg=None):
    args = parse_arg(arg)
    stage = args.pop("stage", "finetune")
    size = QUICK if args.pop("quick", "0") in ("1", "true") else FULL
    method = args.pop("method", "full")
    noise = _noise(args.pop("noise", "0"))
    seed = args.pop("seed", None)
    method_options, rest = split_method_options(args)
    if rest:
        raise ConfigError(f"config arg: unknown key(s) {sorted(rest)} for the data-quality study")
    if stage not in ("pretrain", "finetune"):
        raise ConfigError(f"config arg stage={stage!r}; expected pretrain or finetune")
    if stage == "pretrain":
        noise = 0.0  # one clean base for every noise rate

    # Same seed and sizes: the general sets and the target eval set are
    # identical across noise rates; only target_train's labels differ.
    paths, tokenizer = ensure_suite(seed=0, label_noise=noise, **size["suite"])
    cfg = suite_study_config(size["model"])
    cfg.train.update(log_every=20, keep=1, tensorboard=False)
    cfg.eval.max_examples = size["eval_examples"]  # per eval set, and corrupted prompts scored
    cfg.eval.max_new_tokens = 12  # the longest answer (a sorted 10-letter word) + EOS
    cfg.eval.memorization = True
    if size is QUICK:
        cfg.train.log_every = 2
        cfg.optim.warmup_steps = 2
        cfg.eval.max_new_tokens = 4
    if stage == "pretrain":
        pretrain_on_general(cfg, paths, tokenizer, size["pretrain_steps"], max_warmup=50)
        cfg.data.batch_size = size["pretrain_batch_size"]
    else:
        cfg.data = suite_data_config(paths, tokenizer, general_weight=0.0, target_weight=1.0)
        cfg.model.checkpoint = "{sweep_dir}/base/hf"
        cfg.train.steps = size["finetune_steps"]
        with_method(cfg, method, method_options)
        # Small batches, many steps: at this size the target task is learned
        # per update, not per token (bs 16 x 400 steps beats bs 32 x 200).
        cfg.data.batch_size = size["batch_size"]
        if seed is not None:
            seed_everything(cfg, seed)
    cfg.data.max_eval_examples = size["eval_examples"]
    # `variant` and `label` keep noise rates apart in the report, whose rows
    # group runs by method label and lr (see the study's README section).
    rank = f" r={cfg.method.rank}" if "rank" in cfg.method else ""
    cfg.study = dict(
        name="data_quality",
        stage=stage,
        manifest=paths["manifest"],
        noise=noise,
        variant=f"noise={noise:g}",
        label=f"{cfg.method.name}{rank} noise={noise * 100:g}%",
    )
    return cfg


def get_prerequisites():
    return [("base", "stage=pretrain")]


def get_sweep(arg=None):
    if "quick=1" in (arg or ""):
        # The end-to-end test: two noise rates of one method, which the report
        # must keep apart (the full sweep adds LoRA through the same code).
        return [{"arg": "method=full,noise=0"}, {"arg": "method=full,noise=0.5"}]
    # Three seeds per cell (a seed sets the data order, adapter init and
    # dropout): the report's intervals are over them.
    return [
        {"arg": f"method={m},noise={n:g},seed={seed}"}
        for m in ("full", "lora,rank=16")
        for n in NOISE_RATES
        for seed in SEEDS
    ]
