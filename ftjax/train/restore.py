"""Rebuild a run's parameters from its directory: the config it wrote, the
base it started from and a checkpoint of its trainable part."""

from __future__ import annotations

import os

import jax
import ml_collections

from ftjax import peft
from ftjax.errors import CheckpointError, RunDirError
from ftjax.rundir import RunDir
from ftjax.train.checkpoint import Checkpointer
from ftjax.train.state import build_run, load_base


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run wrote (`--workdir` named in the error when it is not a run)."""
    if not os.path.isdir(workdir):
        raise RunDirError(f"--workdir={workdir}: not a directory; expected a run directory")
    return RunDir(workdir).read_config()


def load_base_model(cfg):
    """(model, base_params on the host): the model before fine-tuning, from the
    config alone (no checkpoint needed)."""
    model, base_params, _ = load_base(cfg.model, int(cfg.train.seed))
    return model, jax.device_get(base_params)


def restore_run(cfg, workdir: str, which: str = "latest"):
    """(model, params, base_params, step): the combined params of checkpoint
    `which` ("latest", "best" or a step number) of the run in `workdir`.
    "latest" is the newest intact checkpoint (damaged newer ones are skipped)."""
    start = build_run(cfg)  # the template, and the frozen part no checkpoint holds
    template = start.state
    ckpt = start.checkpointer(workdir, async_save=False, read_only=True)
    try:
        if which == "latest":
            state, step = ckpt.restore_latest(template, set_aside=False)
            if state is None:
                raise CheckpointError(f"--workdir={workdir}: holds no checkpoint yet")
        else:
            step = _checkpoint_step(ckpt, workdir, which)
            state = ckpt.restore(template, step)
    finally:
        ckpt.close()
    return start.model, peft.combine(state.trainable, state.frozen), start.base_params, step


def _checkpoint_step(ckpt: Checkpointer, workdir: str, which: str) -> int:
    if which == "best":
        best = ckpt.best()
        if best is None:
            raise CheckpointError(
                f"--checkpoint=best: {workdir} recorded no best checkpoint "
                "(train it with train.best_metric set, or use --checkpoint=latest)"
            )
        step = best["step"]
    else:
        try:
            step = int(which)
        except ValueError:
            raise CheckpointError(
                f"--checkpoint={which!r}; expected latest, best or a step number"
            ) from None
    if step not in ckpt.steps():
        raise CheckpointError(
            f"--checkpoint={which}: {workdir} has no checkpoint {step} (have {ckpt.steps()})"
        )
    return step
