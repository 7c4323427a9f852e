"""A small study for the sweep-backend tests: a base model pre-trained as a
prerequisite, then three fine-tuning runs from it that checkpoint every 3 of
their 200 steps, so that a kill lands between checkpoints."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quick():
    path = os.path.join(ROOT, "experiments", "quick", "train.py")
    spec = importlib.util.spec_from_file_location("ftjax_quick_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    from ftjax.experiment import parse_arg
    from ftjax.study.evaluate import default_eval_config

    args = parse_arg(arg)
    stage = args.pop("stage", "finetune")
    cfg = _quick().get_config(",".join(f"{k}={v}" for k, v in args.items()))
    cfg.eval = default_eval_config()
    cfg.eval.update(max_examples=8, max_new_tokens=8, analysis=False)
    cfg.study = dict(name="ray-test", stage=stage, label="")
    if stage == "pretrain":
        cfg.train.update(steps=6, export_hf=True, checkpoint_every=0)
    else:
        cfg.model.checkpoint = "{sweep_dir}/base/hf"
        cfg.train.update(steps=200, checkpoint_every=10, log_every=1, keep=2)
    return cfg


def get_prerequisites():
    return [("base", "stage=pretrain")]


def get_sweep():
    return [{"arg": "method=full"}, {"arg": "method=lora,rank=4"}, {"arg": "method=dora,rank=4"}]
