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

Integrity: once a save is complete, the size and SHA-256 of each of its files
go to `<step>/ftjax_checksums.json`. A restore verifies them first (orbax
itself reads a flipped bit without complaint), then restores; a damaged
checkpoint raises `DamagedCheckpoint`, and `restore_latest` falls back to the
newest intact one, moving the damaged ones to `<workdir>/damaged_checkpoints/`
so the run can write those steps again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from ftjax.errors import CheckpointError
from ftjax.train.metrics import log
from ftjax.train.step import TrainState

CHECKSUMS = "ftjax_checksums.json"


class CheckpointMismatch(CheckpointError):
    """The workdir holds a checkpoint of a different model, method or base."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, truncated or altered."""

    def __init__(self, directory: str, step: int, reason: str):
        super().__init__(f"{directory}: checkpoint {step} is damaged ({reason})")
        self.step, self.reason = step, reason


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


# ----------------------------------------------------------------------------- file checksums


def _file_digests(step_dir: str) -> dict:
    """{relative path: [size, sha256]} of every file of a finished save."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if not rel.startswith(CHECKSUMS):
                out[rel] = [os.path.getsize(path), _sha256(path)]
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(step_dir: str) -> None:
    path = os.path.join(step_dir, CHECKSUMS)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"files": _file_digests(step_dir)}, f, sort_keys=True)
    os.replace(tmp, path)


def verify_checksums(step_dir: str) -> str | None:
    """What is wrong with the files of `step_dir`, or None when they match the
    checksums written at save time (or when none were: a save from before
    checksums, or one killed between orbax's commit and the checksums)."""
    path = os.path.join(step_dir, CHECKSUMS)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return f"{CHECKSUMS} unreadable"
    for rel, (size, digest) in sorted(expected.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return f"{rel} missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} when saved"
        if _sha256(full) != digest:
            return f"{rel} changed since it was saved (checksum mismatch)"
    return None


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    def __init__(
        self,
        directory: str,
        identity: dict,
        keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = os.path.abspath(directory)
        self.identity = identity
        self.keep = max(int(keep), 1)
        self.best_metric, self.best_mode = best_metric, best_mode
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention below: last K plus the best
            enable_async_checkpointing=async_save,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        self._best_path = os.path.join(self.directory, "best.json")
        self._unverified: list[int] = []  # saved steps still without checksums
        self._closed = False

    # ------------------------------------------------------------------ save

    def save(self, state: TrainState, metrics: dict | None = None, force: bool = False) -> None:
        step = (
            int(jax.device_get(state.step))
            if not hasattr(state.step, "addressable_data")
            else int(np.asarray(state.step.addressable_data(0)))
        )
        if step in self.manager.all_steps():
            return
        self._write_pending_checksums()
        meta = {"step": step, "identity": self.identity, "metrics": metrics or {}}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_saved_part(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._unverified.append(step)
        self._update_best(step, metrics)
        self._prune(exclude=step)

    def _write_pending_checksums(self):
        """Checksums of the saves that have finished (waits for the one in flight)."""
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unverified:
                step_dir = os.path.join(self.directory, str(step))
                if os.path.isdir(step_dir):
                    write_checksums(step_dir)
        self._unverified = []

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
        if self._closed:
            return
        self._closed = True
        try:
            self._write_pending_checksums()
        finally:
            self.manager.close()

    # ------------------------------------------------------------------ restore

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, template: TrainState, set_aside: bool = True):
        """(state, step) of the newest intact checkpoint; (None, None) when the
        directory holds none at all. Each damaged newer one is logged and, with
        `set_aside`, moved out of the way so the run can save that step again."""
        damaged = []
        for step in reversed(self.steps()):
            try:
                state = self.restore(template, step)
            except DamagedCheckpoint as e:
                log(f"warning: checkpoint {step} is damaged ({e.reason}); skipping it")
                damaged.append(e)
                continue
            if set_aside and damaged:
                self._set_aside([e.step for e in damaged])
            return state, step
        if damaged:
            reasons = "; ".join(f"step {e.step}: {e.reason}" for e in damaged)
            raise CheckpointError(
                f"{self.directory}: no intact checkpoint ({reasons}); move the directory "
                "aside to start the run over"
            )
        return None, None

    def restore(self, template: TrainState, step: int) -> TrainState:
        """Restores checkpoint `step` into the structure (and shardings) of
        `template`, whose frozen part is kept as is. Raises CheckpointMismatch
        for another run's checkpoint and DamagedCheckpoint for damaged files."""
        reason = verify_checksums(os.path.join(self.directory, str(step)))
        if reason:
            raise DamagedCheckpoint(self.directory, step, reason)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as e:  # orbax raises anything from JSON to tensorstore errors
            raise DamagedCheckpoint(self.directory, step, f"meta: {_first_line(e)}") from None
        self.check_identity(meta.get("identity", {}))
        saved = _saved_part(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
        self._check_structure(step, abstract)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except Exception as e:
            raise DamagedCheckpoint(self.directory, step, f"state: {_first_line(e)}") from None

        def rebuild(tree, flat):
            treedef = jax.tree_util.tree_structure(tree)
            keys = list(_flat(tree))
            return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])

        return template._replace(
            step=restored["step"],
            trainable=rebuild(template.trainable, restored["trainable"]),
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

    def _check_structure(self, step: int, abstract) -> None:
        """The saved arrays' names, shapes and dtypes against this run's (an
        optimizer or precision change that the identity does not cover)."""
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as e:
            raise DamagedCheckpoint(self.directory, step, f"metadata: {_first_line(e)}") from None
        if saved is None:
            return
        have, want = _shapes(saved), _shapes(abstract)
        diff = sorted(set(have) ^ set(want)) or [k for k in sorted(want) if have[k] != want[k]]
        if diff:
            k = diff[0]
            raise CheckpointMismatch(
                f"{self.directory}: checkpoint {step} does not fit this run's parameters "
                f"({k}: saved {have.get(k, 'absent')}, this run {want.get(k, 'absent')}); "
                "use a fresh --workdir"
            )

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged step directories to <workdir>/damaged_checkpoints/."""
        _sync("ftjax_set_aside_start")
        if jax.process_index() == 0:
            root = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
            os.makedirs(root, exist_ok=True)
            for step in steps:
                dest, n = os.path.join(root, str(step)), 1
                while os.path.exists(dest):
                    dest, n = os.path.join(root, f"{step}.{n}"), n + 1
                shutil.move(os.path.join(self.directory, str(step)), dest)
                log(f"moved damaged checkpoint {step} to {dest}")
        _sync("ftjax_set_aside_done")
        self.manager.reload()


def _shapes(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): f"{np.dtype(v.dtype).name}{list(v.shape)}" for k, v in leaves}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
