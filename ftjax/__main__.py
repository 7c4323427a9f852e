"""`python -m ftjax`: the built-in default — the forgetting study end to end
(pre-train a tiny base, fine-tune it with every method, evaluate, report).

    python -m ftjax                      # runs/forgetting/report.md
    python -m ftjax --workdir=DIR --quick
    python -m ftjax --jobs=1             # one run at a time (default: one per core, up to 4)
"""

import argparse
import os
import sys

# The study is configuration, kept with the other experiments of a source checkout.
STUDY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "experiments",
    "forgetting",
    "study.py",
)


def default_jobs() -> int:
    """The study's model is too small to keep more than one or two cores busy
    per run, so its runs share the machine: one per core, up to four."""
    from ftjax.study.runner import usable_cpus

    cpus = usable_cpus()
    return max(1, min(4, len(cpus) if cpus is not None else os.cpu_count() or 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/forgetting")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke version")
    parser.add_argument(
        "--jobs", type=int, default=default_jobs(),
        help="fine-tuning runs at a time, each on its share of the cores (default: %(default)s)",
    )  # fmt: skip
    args = parser.parse_args()
    if not os.path.exists(STUDY):
        print("error: experiments/ not found: run from a source checkout", file=sys.stderr)
        return 2
    from ftjax import cli
    from ftjax.study.report import write_report
    from ftjax.study.runner import PREEMPTED_EXIT, Preempted, RunFailed
    from ftjax.study.runner import main as sweep

    def study(_):
        try:
            sweep(STUDY + (":quick=1" if args.quick else ""), args.workdir, quiet=True,
                  jobs=args.jobs)  # fmt: skip
        except RunFailed as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.code)
        except Preempted as e:
            print(f"stopped: {e}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT)
        print(f"report: {write_report(args.workdir)}")

    cli.run_main(study, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
