"""What the JAX and PyTorch jobs share: the synthetic batch, best-of timing,
and the measured step of a training and of an inference job, so that both
frameworks are timed by the same code."""

from __future__ import annotations

import time

import numpy as np


def synthetic_batch(vocab: int, batch: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    return {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=1),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


def best_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class TrainStep:
    """A training job's measured step: its `_step` timed, then the matmul peak
    measured right after it (unless the spec turns that off), so that MFU
    divides by the peak of the same moment on a shared machine."""

    def step(self) -> dict:
        t = time.perf_counter()
        self._step()
        out = {"step_s": time.perf_counter() - t}
        if self.spec.get("measure_peak", True):
            out["peak_flops"] = self.measure_peak()
        return out


class InferStep:
    """An inference job's measured step: the prefill (a one-token generation)
    and the per-token decode time of `decode_tokens` more, by difference."""

    def step(self) -> dict:
        k = self.spec["decode_tokens"]
        prefill = best_time(lambda: self._generate(1), 1)
        total = best_time(lambda: self._generate(k + 1), 1)
        return {"prefill_s": prefill, "decode_s": max(total - prefill, 0.0) / k}
