"""A seconds-long run on the synthetic suite: random-init tiny Llama, any
method. The exact-resume and preemption tests drive it through scripts/train.py.

    python scripts/train.py --config=experiments/quick/train.py:method=lora,rank=4 \
        --workdir=/tmp/quick
"""

from ftjax.data import suite_data_config
from ftjax.errors import ConfigError
from ftjax.experiment import ensure_suite, parse_arg, split_method_options, with_method
from ftjax.train import default_config


def get_config(arg=None):
    args = parse_arg(arg)
    method = args.pop("method", "full")
    method_options, rest = split_method_options(args)
    if rest:
        raise ConfigError(f"config arg: unknown key(s) {sorted(rest)}; expected method options")
    paths, tokenizer = ensure_suite(
        seed=0, general_train=400, general_eval=16, target_train=100, target_eval=16
    )
    cfg = default_config()
    cfg.model.init.update(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
    )
    cfg.data = suite_data_config(paths, tokenizer, general_weight=1.0, target_weight=1.0)
    cfg.data.batch_size = 8
    cfg.optim.update(lr=1e-3, warmup_steps=2, weight_decay=0.01)
    cfg.train.update(steps=8, log_every=1, checkpoint_every=2, keep=2, tensorboard=False)
    with_method(cfg, method, method_options)
    return cfg
