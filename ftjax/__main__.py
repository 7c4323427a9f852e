"""`python -m ftjax`: the built-in default — the forgetting study end to end
(pre-train a tiny base, fine-tune it with every method, evaluate, report).

    python -m ftjax                      # runs/forgetting/report.md
    python -m ftjax --workdir=DIR --quick
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/forgetting")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke version")
    args = parser.parse_args()
    study = os.path.join(ROOT, "experiments", "forgetting", "study.py")
    if not os.path.exists(study):
        print("error: experiments/ not found: run from a source checkout", file=sys.stderr)
        return 2
    config = study + (":quick=1" if args.quick else "")
    for script, extra in (("sweep.py", [f"--config={config}", "--quiet"]), ("report.py", [])):
        cmd = [sys.executable, os.path.join(ROOT, "scripts", script), f"--workdir={args.workdir}"]
        code = subprocess.call(cmd + extra)
        if code:
            return code
    print(f"\nreport: {os.path.join(args.workdir, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
