"""Export a run's checkpoint for the PyTorch / Hugging Face world: merged
weights in HF layout (loadable by transformers) and, for LoRA/DoRA runs, the
HF PEFT adapter files (loadable by peft.PeftModel.from_pretrained).

    python scripts/export.py --workdir=RUN --out=RUN/export [--checkpoint=best] [--dtype=bfloat16]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _cli import parse_flags, run_main  # noqa: E402
from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (hf/ and adapter/ inside).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
_DTYPE = flags.DEFINE_string("dtype", "", "Cast the merged weights (e.g. bfloat16).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    from ftjax import peft
    from ftjax.models import save_pretrained
    from ftjax.peft import registry
    from ftjax.train.restore import load_run_config, restore_run

    cfg = load_run_config(_WORKDIR.value)
    model, params, base_params, step = restore_run(cfg, _WORKDIR.value, _CHECKPOINT.value)
    hf_dir = os.path.join(_OUT.value, "hf")
    save_pretrained(model, peft.merge(params), hf_dir, dtype=_DTYPE.value or None)
    print(f"merged weights (step {step}): {hf_dir}")
    spec = registry.get(cfg.method.name)
    if spec.export is None:
        print(f"no HF PEFT adapter: {spec.no_export}")
    elif peft.has_adapters(params):
        adapter_dir = os.path.join(_OUT.value, "adapter")
        method = registry.resolve_config(cfg.method)
        spec.export(model.cfg, params, adapter_dir, method, initial=base_params)
        print(f"HF PEFT adapter: {adapter_dir}")


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
