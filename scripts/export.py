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
    from ftjax.train.restore import load_run_config, restore_run

    cfg = load_run_config(_WORKDIR.value)
    model, params, _, step = restore_run(cfg, _WORKDIR.value, _CHECKPOINT.value)
    hf_dir = os.path.join(_OUT.value, "hf")
    save_pretrained(model, peft.merge(params), hf_dir, dtype=_DTYPE.value or None)
    print(f"merged weights (step {step}): {hf_dir}")
    if peft.has_adapters(params) and cfg.method.name in ("lora", "dora"):
        if cfg.method.get("init") == "pissa":
            print("PiSSA adapter: export the merged weights, or convert with peft.pissa_to_lora")
        else:
            adapter_dir = os.path.join(_OUT.value, "adapter")
            peft.save_adapter(model.cfg, params, adapter_dir, method=cfg.method)
            print(f"HF PEFT adapter: {adapter_dir}")


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
