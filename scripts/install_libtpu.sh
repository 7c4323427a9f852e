#!/usr/bin/env bash
# Installs the libtpu that matches the installed jax into <repo>/.tpu-site
# (not into the environment): scripts/plan.py and the TPU-target tests then
# compile for Cloud TPU slices with no TPU attached, while ordinary runs and
# tests never load libtpu. Use it with
#   PYTHONPATH=.tpu-site python scripts/plan.py --target=v5e-8 ...
# (or `pip install "jax[tpu]==<jax version>"` into a separate environment).
set -euo pipefail
cd "$(dirname "$0")/.."
jax_version=$(python -c "import jax; print(jax.__version__)")
libtpu=$(pip install -q --dry-run --ignore-installed --report - "jax[tpu]==${jax_version}" |
  python -c "import json, sys
r = json.load(sys.stdin)
print(next(f\"libtpu=={p['metadata']['version']}\" for p in r['install']
           if p['metadata']['name'] == 'libtpu'))")
pip install -q --no-deps --upgrade --target .tpu-site "$libtpu"
echo "installed $libtpu for jax $jax_version in .tpu-site"
