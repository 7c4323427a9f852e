"""Checkpoints through orbax-checkpoint's CheckpointManager.

What is saved: the trainable parameters, optimizer state, step, RNG and the
NaN-skip counter (the data position is the step: batches are a pure function
of it), plus a JSON record of the run's identity. The frozen base is *not*
re-written every save: it is rebuilt from its source on resume and recorded by
source and checksum, so resuming on a different base fails loudly.

Saves are asynchronous. orbax writes each step into a temporary directory and
renames it when complete, so a kill during a save leaves the previous
checkpoint as the latest usable one (unfinished temporaries are ignored and
cleaned up). Retention is ours: keep the last `keep` steps plus the best one by
a chosen eval metric.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from ftjax.errors import CheckpointError
from ftjax.train.step import TrainState


class CheckpointMismatch(CheckpointError):
    """The workdir holds a checkpoint of a different model, method or base."""


def _flat(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): v for k, v in leaves}


def _saved_part(state: TrainState) -> dict:
    return {
        "step": state.step,
        "trainable": _flat(state.trainable),
        "opt_state": _flat(state.opt_state),
        "rng": state.rng,
        "skipped": state.skipped,
    }


def checksum_files(paths) -> str:
    """A fast identity of weight files: their safetensors headers and sizes
    (hashing every byte of a multi-GB base on each resume would be slow, and
    the header already names every tensor with its shape, dtype and offsets)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 1 << 26)))
        h.update(str(os.path.getsize(p)).encode())
    return h.hexdigest()[:16]


class Checkpointer:
    def __init__(
        self,
        directory: str,
        identity: dict,
        keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        self.identity = identity
        self.keep = max(int(keep), 1)
        self.best_metric, self.best_mode = best_metric, best_mode
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention below: last K plus the best
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )
        self._best_path = os.path.join(self.directory, "best.json")

    # ------------------------------------------------------------------ save

    def save(self, state: TrainState, metrics: dict | None = None, force: bool = False) -> None:
        step = (
            int(jax.device_get(state.step))
            if not hasattr(state.step, "addressable_data")
            else int(np.asarray(state.step.addressable_data(0)))
        )
        if step in self.manager.all_steps():
            return
        meta = {"step": step, "identity": self.identity, "metrics": metrics or {}}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_saved_part(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        if _test_kill_during_save(step):
            os.kill(os.getpid(), 9)
        self._update_best(step, metrics)
        self._prune(exclude=step)

    def _update_best(self, step, metrics):
        if not self.best_metric or not metrics or self.best_metric not in metrics:
            return
        value = float(metrics[self.best_metric])
        best = self.best()
        better = best is None or (
            value < best["value"] if self.best_mode == "min" else value > best["value"]
        )
        if better:
            tmp = self._best_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"step": step, "metric": self.best_metric, "value": value}, f)
            os.replace(tmp, self._best_path)

    def best(self) -> dict | None:
        if not os.path.exists(self._best_path):
            return None
        with open(self._best_path) as f:
            return json.load(f)

    def _prune(self, exclude: int):
        best = self.best()
        steps = sorted(self.manager.all_steps())
        keep = set(steps[-self.keep :]) | {exclude}
        if best:
            keep.add(best["step"])
        for s in steps:
            if s not in keep:
                self.manager.delete(s)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------------ restore

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, template: TrainState, step: int | None = None) -> TrainState:
        """Restores into the structure (and shardings) of `template`, whose
        frozen part is kept as is."""
        step = self.latest_step() if step is None else step
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
        self.check_identity(meta.get("identity", {}))
        saved = _saved_part(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except (ValueError, KeyError) as e:
            raise CheckpointMismatch(
                f"{self.directory}: checkpoint {step} does not fit this run's parameters "
                f"({str(e).splitlines()[0][:200]}); use a fresh --workdir"
            ) from None

        def rebuild(tree, flat):
            treedef = jax.tree_util.tree_structure(tree)
            keys = list(_flat(tree))
            return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])

        return TrainState(
            step=restored["step"],
            trainable=rebuild(template.trainable, restored["trainable"]),
            frozen=template.frozen,
            opt_state=rebuild(template.opt_state, restored["opt_state"]),
            rng=restored["rng"],
            skipped=restored["skipped"],
        )

    def check_identity(self, saved: dict):
        for key in ("model", "method", "base"):
            if key in saved and saved[key] != self.identity.get(key):
                raise CheckpointMismatch(
                    f"{self.directory}: holds a checkpoint of a different {key} "
                    f"(saved {json.dumps(saved[key], sort_keys=True)[:160]}, this run "
                    f"{json.dumps(self.identity.get(key), sort_keys=True)[:160]}); "
                    "use a fresh --workdir"
                )


def _test_kill_during_save(step: int) -> bool:
    """Test hook: SIGKILL this process right after a save of `step` starts, to
    prove that a kill mid-save leaves the previous checkpoint usable."""
    return os.environ.get("FTJAX_TEST_KILL_DURING_SAVE") == str(step)
