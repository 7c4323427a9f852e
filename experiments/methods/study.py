"""The methods study: every fine-tuning method ftjax has, side by side on the
forgetting study's model, data, steps and selection rule (it reuses that
study's configuration: experiments/forgetting/study.py), each at its own
selected learning rate: trainable parameters, training-state memory, target
learned and general ability forgotten, with 95% intervals over 3 seeds.

    python scripts/sweep.py --config=experiments/methods/study.py --workdir=runs/methods --jobs=2
    python scripts/report.py --workdir=runs/methods

`quick=1` is the seconds-long end-to-end check the test suite runs. Measured
wall time and results: README, "Methods".
"""

import importlib.util
import os

from ftjax.experiment import parse_arg

_FORGETTING_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "forgetting", "study.py"
)


def _forgetting_study():
    spec = importlib.util.spec_from_file_location("ftjax_forgetting_study", _FORGETTING_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FORGETTING = _forgetting_study()

# Every row: its method arg and its own learning-rate grid (the forgetting
# study's grid where the method is in both; elsewhere three rates around the
# method paper's, a factor of ~3 apart).
ROWS = {
    "full": ("method=full", [3e-4, 1e-3, 3e-3]),
    "galore r=64": ("method=galore,rank=64", [1e-3, 3e-3, 1e-2]),
    "lora r=16": ("method=lora,rank=16", [3e-3, 1e-2, 3e-2]),
    "lora+ r=16": ("method=lora,rank=16,loraplus_ratio=16", [3e-4, 1e-3, 3e-3]),
    "lora-fa r=16": ("method=lora,rank=16,fa=1", [3e-3, 1e-2, 3e-2]),
    "dora r=16": ("method=dora,rank=16", [1e-3, 3e-3, 1e-2]),
    "qlora r=16": ("method=qlora,rank=16", [3e-3, 1e-2, 3e-2]),
    "pissa r=16": ("method=pissa,rank=16", [3e-4, 1e-3, 3e-3]),
    "adalora r=24→16": ("method=adalora,init_r=24,target_r=16", [3e-3, 1e-2, 3e-2]),
    "vera r=256": ("method=vera,rank=256", [3e-3, 1e-2, 3e-2]),
    "ia3": ("method=ia3", [1e-2, 3e-2, 1e-1]),
    "loha r=8": ("method=loha,rank=8", [1e-3, 3e-3, 1e-2]),
    "lokr r=8": ("method=lokr,rank=8", [1e-3, 3e-3, 1e-2]),
    "oft": ("method=oft", [1e-3, 3e-3, 1e-2]),
    "bitfit": ("method=bitfit", [3e-2, 1e-1, 3e-1]),
    "freeze all but last layer": ("method=freeze,last_layers=1", [1e-3, 3e-3, 1e-2]),
    "prompt tuning (16 tokens)": ("method=prompt_tuning,num_virtual_tokens=16", [3e-2, 1e-1, 3e-1]),
    "prefix tuning (16 tokens)": ("method=prefix_tuning,num_virtual_tokens=16", [3e-3, 1e-2, 3e-2]),
}
QUICK_ROWS = {
    "full": ("method=full", [3e-3]),
    "lora r=4": ("method=lora,rank=4", [3e-3]),
    "galore r=4": ("method=galore,rank=4,update_proj_gap=2", [3e-3]),
    "adalora r=4→2": ("method=adalora,init_r=4,target_r=2", [3e-3]),
    "prompt tuning (4 tokens)": ("method=prompt_tuning,num_virtual_tokens=4", [1e-1]),
}
COMPARISONS = [
    ("full", "galore r=64"),
    ("full", "lora r=16"),
    ("lora+ r=16", "lora r=16"),
    ("lora-fa r=16", "lora r=16"),
    ("dora r=16", "lora r=16"),
    ("pissa r=16", "lora r=16"),
    ("adalora r=24→16", "lora r=16"),
    ("vera r=256", "lora r=16"),
]


def get_config(arg=None):
    cfg = _FORGETTING.get_config(arg)
    cfg.study.name = "methods"
    return cfg


def get_prerequisites():
    return _FORGETTING.get_prerequisites()


def get_selection(arg=None):
    selection = _FORGETTING.get_selection(arg)
    quick = parse_arg(arg).get("quick", "0") in ("1", "true")
    rows = QUICK_ROWS if quick else ROWS
    selection["rows"] = {
        label: dict(arg=a, grid={"optim.lr": lrs}) for label, (a, lrs) in rows.items()
    }
    selection["comparisons"] = [("full", "lora r=4")] if quick else COMPARISONS
    return selection
