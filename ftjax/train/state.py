"""The only place a `TrainState` is built.

The training loop, resuming and restoring a checkpoint (evaluate, export),
the benchmark and the tests all start a run's state the same way:

    base params --method.apply(., key.method)--> adapted params
                --method.split--> (trainable, frozen)
                --tx.init(trainable)--> TrainState at step 0, rng from key.train

with one seed convention (`seed_keys`). The frozen part is never saved in a
checkpoint: a resume rebuilds it from the base, so a bit-identical resume
depends on every builder deriving the same keys from `train.seed`, which is
why that derivation lives here and nowhere else.

    init_state(base, method, tx, seed)  pure (the bench jits it): the state
    state_info(state, method)           its parameter counts and bytes
    build_run(cfg)                      from a run config: model, base, method,
                                        optimizer, state, checkpoint identity
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ftjax import peft
from ftjax.models import ModelConfig, build_model, config_to_hf, from_pretrained
from ftjax.models.hf import resolve_dir
from ftjax.train import metrics as metrics_lib
from ftjax.train.checkpoint import Checkpointer, checksum_files
from ftjax.train.config import execution_options, ignored_init_fields, init_fields
from ftjax.train.optim import build_optimizer
from ftjax.train.step import StepConfig, TrainState

__all__ = [
    "RunStart",
    "SeedKeys",
    "StateInfo",
    "TrainState",
    "build_run",
    "init_state",
    "load_base",
    "run_identity",
    "seed_keys",
    "state_info",
    "step_config",
]


class SeedKeys(NamedTuple):
    """The PRNG keys a run derives from its seed."""

    init: jax.Array  # random init of the base model (when there is no checkpoint)
    method: jax.Array  # the method's adapter init (LoRA's `a`, ...)
    train: jax.Array  # dropout etc.; advanced by every step


def seed_keys(seed: int) -> SeedKeys:
    """`key(seed)` initialises the base; `key(seed + 1)` splits into the
    method's and the training keys. Changing this changes every run's numbers,
    and a random-init run would resume on another frozen base than the one
    its checkpoints were trained on (their identity records only the seed)."""
    method, train = jax.random.split(jax.random.key(seed + 1))
    return SeedKeys(jax.random.key(seed), method, train)


def init_state(base_params, method, tx, seed: int) -> TrainState:
    """The state at step 0: `method` applied to `base_params` and split,
    the optimizer state of the trainable part only (frozen weights get none).

    Pure, so it can run under `jax.jit` (`seed` is then a static Python int).

    >>> import optax
    >>> from ftjax import peft
    >>> base = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    >>> state = init_state(base, peft.build_method("full"), optax.sgd(0.1), seed=0)
    >>> int(state.step), jax.tree.structure(state.trainable) == jax.tree.structure(base)
    (0, True)
    """
    keys = seed_keys(seed)
    trainable, frozen = method.split(method.apply(base_params, keys.method))
    return TrainState(
        # Two buffers, not one shared zero: the state is donated to each step,
        # and one buffer cannot be donated twice.
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=tx.init(trainable),
        rng=jax.random.key_data(keys.train),
        skipped=jnp.zeros((), jnp.int32),
    )


class StateInfo(NamedTuple):
    """What a method makes of a model, read off a state (shapes only)."""

    n_trainable: int
    n_total: int
    n_matmul: int  # weights in matmuls (embeddings excluded), adapters materialized
    n_trainable_matmul: int
    nbytes: dict  # {"trainable", "frozen", "opt_state"}: bytes of each part

    @property
    def train_state_bytes(self) -> int:
        """Weights + gradients + optimizer state: the memory a method decides
        (activations aside); gradients are the size of the trainable part."""
        b = self.nbytes
        return int(2 * b["trainable"] + b["frozen"] + b["opt_state"])

    @property
    def trainable_share(self) -> float:
        return self.n_trainable / max(self.n_total, 1)

    def flops_per_token(self, model_cfg, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), for MFU."""
        return metrics_lib.train_flops_per_token(
            self.n_matmul, self.n_trainable_matmul, model_cfg, seq_len
        )


def state_info(state: TrainState, method) -> StateInfo:
    """Parameter counts and bytes of `state` under `method` (works on arrays
    and on `jax.eval_shape` results alike)."""
    params = peft.combine(state.trainable, state.frozen)
    n_trainable, n_total = method.count(params)
    n_matmul, n_trainable_matmul = metrics_lib.matmul_param_counts(params, state.trainable)
    nbytes = {
        part: peft.nbytes(getattr(state, part)) for part in ("trainable", "frozen", "opt_state")
    }
    return StateInfo(int(n_trainable), int(n_total), n_matmul, n_trainable_matmul, nbytes)


# ----------------------------------------------------------------------------- from a config


def load_base(mcfg, seed: int):
    """(model, params, identity) of the model fine-tuning starts from: the
    checkpoint (a warning names the `model.init` fields it overrides), or a
    random init of `model.init`; the `model` section's execution options
    (dtype, param_dtype, scan_layers, remat, attention) apply to both."""
    options = execution_options(mcfg)
    if mcfg.checkpoint:
        model, params = from_pretrained(mcfg.checkpoint, **options, head_seed=seed)
        ignored = ignored_init_fields(mcfg, model.cfg)
        if ignored:
            metrics_lib.log(f"warning: {ignored}")
        files = glob.glob(os.path.join(resolve_dir(mcfg.checkpoint), "*.safetensors"))
        base = {"source": mcfg.checkpoint, "checksum": checksum_files(files)}
    else:
        cfg = ModelConfig(**init_fields(mcfg), **options)
        model = build_model(cfg)
        params = model.init(seed_keys(seed).init, jnp.zeros((1, 1), jnp.int32))["params"]
        base = {"source": "random-init", "seed": seed}
    return model, params, base


def run_identity(cfg, model, base_identity: dict) -> dict:
    """What a checkpoint must match to be restored into this run: the model
    architecture, the method config and the base weights' identity."""
    return {"model": config_to_hf(model.cfg), "method": cfg.method.to_dict(), "base": base_identity}


@dataclasses.dataclass
class RunStart:
    """A run at step 0, built from its config alone (see `build_run`)."""

    model: Any
    base_params: Any  # on the host: the device state is donated to each step
    method: Any
    tx: Any
    schedule: Any
    state: TrainState  # built eagerly, not yet placed (`Parallel.place_state`)
    identity: dict  # see `run_identity`

    def checkpointer(self, workdir: str, **options) -> Checkpointer:
        """The Checkpointer of `<workdir>/checkpoints`, which refuses
        checkpoints of another model, method or base."""
        return Checkpointer(os.path.join(workdir, "checkpoints"), self.identity, **options)


def build_run(cfg) -> RunStart:
    """The base model, method, optimizer and step-0 state of the run `cfg`
    describes: what training starts from and what a checkpoint of the run is
    restored into (its frozen part is rebuilt here, never read from disk)."""
    seed = int(cfg.train.seed)
    model, base_params, base_identity = load_base(cfg.model, seed)
    base_params = jax.device_get(base_params)
    method = peft.build_method(cfg.method)
    tx, schedule = build_optimizer(cfg.optim, cfg.train.steps, lr_scales=method.lr_scales())
    tx = method.optimizer(tx, schedule, cfg.train.steps, cfg.optim)
    state = init_state(base_params, method, tx, seed)
    identity = run_identity(cfg, model, base_identity)
    return RunStart(model, base_params, method, tx, schedule, state, identity)


def step_config(cfg) -> StepConfig:
    """The static step settings of the run `cfg` (the loop and the planner
    compile the same step from them)."""
    return StepConfig(
        accum_steps=int(cfg.optim.accum_steps),
        z_loss=float(cfg.train.z_loss),
        label_smoothing=float(cfg.train.label_smoothing),
        loss_chunk=int(cfg.train.get("loss_chunk", -1)),
        penalty=peft.build_method(cfg.method).penalty(),
    )
