"""Two processes joined with jax.distributed (CPU collectives over gloo on
127.0.0.1), each feeding its own half of the global batch, train to the same
parameters as one process fed the whole batch."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")

pytestmark = pytest.mark.slow  # spawns jax.distributed processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(nproc, out, method):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(port), str(i), str(nproc), str(out), method],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(nproc)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    return dict(np.load(out))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_match_one(tmp_path, method):
    one = run_workers(1, tmp_path / "one.npz", method)
    two = run_workers(2, tmp_path / "two.npz", method)
    assert one.keys() == two.keys()
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    for k in one:
        ref = one[k].astype(np.float64)
        assert np.linalg.norm(two[k] - ref) <= 1e-5 * max(np.linalg.norm(ref), 1e-12), k
    assert one["losses"][0] != one["losses"][-1]
