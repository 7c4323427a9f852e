"""A seconds-long classification run: a tiny random-init BERT over
all-MiniLM-L6-v2's tokenizer (the installed package) on the generated
negation task (ftjax.data.sentences), any method. The exact-resume tests
drive it through scripts/train.py as they drive experiments/quick/train.py.

    python scripts/train.py --config=experiments/quick/classify.py:method=lora,rank=4 \
        --workdir=/tmp/quick-classify
"""

import importlib.util
import os

from ftjax.errors import ConfigError
from ftjax.experiment import ensure_sentence_task, parse_arg, split_method_options, with_method
from ftjax.train import default_config

_MINILM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minilm",
                       "study.py")  # fmt: skip


def _minilm_dir() -> str:
    spec = importlib.util.spec_from_file_location("ftjax_minilm_study", _MINILM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.minilm_dir()


def get_config(arg=None):
    args = parse_arg(arg)
    method = args.pop("method", "full")
    method_options, rest = split_method_options(args)
    if rest:
        raise ConfigError(f"config arg: unknown key(s) {sorted(rest)}; expected method options")
    files = ensure_sentence_task(0, train=200, eval_=32, val=0, probe_pairs=8)
    cfg = default_config()
    cfg.model.init.update(model_type="bert", vocab_size=30522, hidden_size=32,
                          intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                          max_position_embeddings=64, type_vocab_size=2)  # fmt: skip
    cfg.model.update(task="sequence_classification", num_labels=2)
    cfg.data.update(tokenizer=_minilm_dir(), seq_len=24, batch_size=8, packing=False)
    cfg.data.sources = {
        "target": dict(path=files["train"], eval_path=files["eval"], format="classification")
    }
    cfg.optim.update(lr=1e-3, warmup_steps=2, weight_decay=0.01)
    cfg.train.update(steps=8, log_every=1, checkpoint_every=2, keep=2, tensorboard=False)
    with_method(cfg, method, method_options)
    return cfg
