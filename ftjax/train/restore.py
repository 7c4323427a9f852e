"""Rebuild a run's parameters from its directory: the config it wrote, the
base it started from and a checkpoint of its trainable part."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from ftjax import peft
from ftjax.train.checkpoint import Checkpointer
from ftjax.train.loop import load_base, model_identity
from ftjax.train.optim import build_optimizer
from ftjax.train.step import TrainState


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no run config (is --workdir a run directory?)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_run(cfg, workdir: str, which: str = "latest"):
    """(model, params, base_params, step): the combined params of checkpoint
    `which` ("latest", "best" or a step number) of the run in `workdir`."""
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
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), identity, async_save=False)
    if which == "latest":
        step = ckpt.latest_step()
    elif which == "best":
        best = ckpt.best()
        if best is None:
            raise ValueError(
                f"--checkpoint=best: {workdir} recorded no best checkpoint (train.best_metric)"
            )
        step = best["step"]
    else:
        try:
            step = int(which)
        except ValueError:
            raise ValueError(
                f"--checkpoint={which!r}; expected latest, best or a step number"
            ) from None
    if step is None or step not in ckpt.manager.all_steps():
        raise FileNotFoundError(
            f"{workdir}: no checkpoint {which} (have {sorted(ckpt.manager.all_steps())})"
        )
    state = ckpt.restore(template, step)
    ckpt.close()
    return model, peft.combine(state.trainable, state.frozen), base_params, step
