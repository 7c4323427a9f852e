"""Rebuild a run's parameters from its directory: the config it wrote, the
base it started from and a checkpoint of its trainable part."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from ftjax import peft
from ftjax.errors import CheckpointError, RunDirError
from ftjax.rundir import RunDir
from ftjax.train.checkpoint import Checkpointer
from ftjax.train.loop import load_base, model_identity
from ftjax.train.optim import build_optimizer
from ftjax.train.step import TrainState


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
    seed = int(cfg.train.seed)
    model, base_params, base_identity = load_base(cfg.model, seed)
    base_params = jax.device_get(base_params)
    method = peft.build_method(cfg.method)
    rng_method, rng_train = jax.random.split(jax.random.key(seed + 1))
    params = method.apply(base_params, rng_method)
    trainable, frozen = method.split(params)
    tx, _ = build_optimizer(cfg.optim, cfg.train.steps)
    template = TrainState(
        jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable),
        jax.random.key_data(rng_train), jnp.zeros((), jnp.int32),
    )  # fmt: skip
    identity = {
        "model": model_identity(model),
        "method": cfg.method.to_dict(),
        "base": base_identity,
    }
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"), identity, async_save=False, read_only=True
    )
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
    return model, peft.combine(state.trainable, state.frozen), base_params, step


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
