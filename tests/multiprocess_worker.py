"""One process of the two-process data-parallel test (run by test_multiprocess.py).

usage: multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz METHOD
"""

import os
import sys

os.environ.pop("XLA_FLAGS", None)  # one CPU device per process

import jax  # noqa: E402

port, pid, nproc, out, method = sys.argv[1:6]
pid, nproc = int(pid), int(nproc)
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_train_parallel import initial_state, make_batch  # noqa: E402

from ftjax.data import process_slice  # noqa: E402
from ftjax.train import Parallel, StepConfig  # noqa: E402
from ftjax.train.parallel import to_host  # noqa: E402

model, tx, state = initial_state(method)
par = Parallel("data" if nproc > 1 else "single", model, tx, StepConfig())
state = par.place_state(state)
rows = process_slice(8, pid, nproc)
losses = []
for step in range(3):
    batch = make_batch(step)
    local = {k: v[rows] for k, v in batch.items()}  # this process's rows only
    state, metrics = par.train_step(state, par.place_batch(local))
    losses.append(float(to_host(metrics["loss"])))
leaves = jax.tree_util.tree_flatten_with_path(state.trainable)[0]
arrays = {jax.tree_util.keystr(k): to_host(v) for k, v in leaves}
if pid == 0:
    np.savez(out, losses=np.array(losses), **arrays)
if nproc > 1:
    jax.distributed.shutdown()
