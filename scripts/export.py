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
    from ftjax.study.checkpoints import export_checkpoint

    written = export_checkpoint(_WORKDIR.value, _OUT.value, _CHECKPOINT.value, _DTYPE.value)
    print(f"merged weights (step {written['step']}): {written['hf']}")
    if "adapter" in written:
        print(f"HF PEFT adapter: {written['adapter']}")
    elif "no_adapter" in written:
        print(f"no HF PEFT adapter: {written['no_adapter']}")


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
