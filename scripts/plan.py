"""Plan a run before paying for hardware: compile the exact train step of a
`scripts/train.py` config ahead of time for a target and print what each
device needs (parameters, optimizer state, temporaries, total against the
device's memory), the compiled FLOPs and a roofline step-time estimate.

    python scripts/plan.py --config=experiments/scale/llama8b.py:lora --target=v5e-8
    python scripts/plan.py --config=experiments/quick/train.py --target=cpu:8 \
        --config.parallel.mode=fsdp --out=plan.json

--target: `local` (this process's devices), `cpu:N` (N simulated CPU
devices) or a Cloud TPU type (`v4-8`, `v5e-8`, `v5e-16`, `v5p-8`, `v6e-8`,
...), which needs libtpu (`pip install "jax[tpu]==<jax version>"`) but no TPU.
Only the model's config.json is read. Exits 0 whether or not the run fits
(the report says which); 2 with one line on bad input.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _cli import parse_flags, run_main  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_TARGET = flags.DEFINE_string("target", "local", "local | cpu:N | a Cloud TPU type (v5e-8, ...).")
_OUT = flags.DEFINE_string("out", "", "Also write the report as JSON to this path.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from ftjax.train import plan as plan_lib
    from ftjax.train import targets, validate_run_config

    targets.request_cpu_devices(_TARGET.value)  # before JAX starts its backends
    validate_run_config(_CONFIG.value)
    target = targets.resolve_target(_TARGET.value)
    report = plan_lib.plan(_CONFIG.value, target)
    print(plan_lib.format_report(report))
    if _OUT.value:
        from ftjax.rundir import write_json_atomic

        write_json_atomic(_OUT.value, report)
        print(f"report: {_OUT.value}")


if __name__ == "__main__":
    app.run(lambda argv: run_main(main, argv), flags_parser=parse_flags)
