"""tests/ray_study.py with its fine-tuning run on two hosts (processes) of
one CPU each, data-parallel: the Ray backend starts it as a gang."""

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_study.py")
_spec = importlib.util.spec_from_file_location("ftjax_ray_study", _PATH)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
    cfg = _base.get_config(arg)
    if "stage=pretrain" not in (arg or ""):
        cfg.resources = dict(cpus=1, hosts=2)
        cfg.parallel.mode = "data"
        cfg.train.steps = 20
    return cfg


def get_prerequisites():
    return _base.get_prerequisites()


def get_sweep():
    return [{"arg": "method=lora,rank=4"}]
