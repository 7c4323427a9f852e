"""The run config: one ConfigDict with model, method, data, optim, train,
parallel sections. Experiment files start from `default_config()` and change
only what they name."""

from __future__ import annotations

import dataclasses

import ml_collections

from ftjax.models import ModelConfig
from ftjax.train.optim import ConfigError, default_optim_config
from ftjax.train.parallel import MODES


def default_model_config() -> ml_collections.ConfigDict:
    fields = {
        f.name: f.default
        for f in dataclasses.fields(ModelConfig)
        if f.name not in ("rope_scaling", "head_dim", "sliding_window")
    }
    return ml_collections.ConfigDict(
        dict(
            # A local HF checkpoint dir or a hub id; empty = random init from `init`.
            checkpoint="",
            init=fields,
            dtype="float32",  # compute dtype (bfloat16 for mixed precision)
            param_dtype="float32",  # master weights and optimizer state
            scan_layers=False,
            remat=False,
        )
    )


def default_train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            steps=100,
            seed=0,
            log_every=10,
            eval_every=0,  # 0: evaluate only at the end
            eval_max_batches=0,  # 0: the whole eval sets
            checkpoint_every=0,  # 0: only at the end
            keep=2,
            best_metric="",  # e.g. "eval/target/loss"; kept besides the last `keep`
            best_mode="min",
            async_checkpoint=True,
            # Stop with an error after this many updates in a row were skipped by
            # the NaN/Inf guard (a diverged run); 0: never stop, only warn.
            max_consecutive_skips=10,
            z_loss=0.0,
            label_smoothing=0.0,
            peak_flops=0.0,  # per-device peak FLOP/s for MFU (0: MFU not reported)
            tensorboard=True,
            export_hf=False,  # write merged weights in HF layout to <workdir>/hf
            export_adapter=True,  # write HF PEFT adapter files for LoRA/DoRA runs
        )
    )


def default_parallel_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            mode="single",
            model_parallel=0,  # tensor mode: size of the `model` mesh axis (0: auto)
            distributed=False,  # call jax.distributed.initialize() (multi-host)
            coordinator_address="",
            num_processes=0,
            process_id=-1,
        )
    )


def default_config() -> ml_collections.ConfigDict:
    from ftjax.data import default_data_config

    cfg = ml_collections.ConfigDict()
    cfg.model = default_model_config()
    cfg.method = ml_collections.ConfigDict({"name": "full"})
    cfg.data = default_data_config()
    cfg.optim = default_optim_config()
    cfg.train = default_train_config()
    cfg.parallel = default_parallel_config()
    return cfg


def validate_run_config(cfg) -> None:
    """Cross-section checks; each failure is one line naming the field."""
    if cfg.train.steps < 1:
        raise ConfigError(f"train.steps={cfg.train.steps}; expected a positive integer")
    if cfg.parallel.mode not in MODES:
        raise ConfigError(
            f"parallel.mode={cfg.parallel.mode!r}; expected one of {', '.join(MODES)}"
        )
    if cfg.train.best_mode not in ("min", "max"):
        raise ConfigError(f"train.best_mode={cfg.train.best_mode!r}; expected 'min' or 'max'")
    if int(cfg.optim.get("warmup_steps", 0)) > cfg.train.steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} is larger than "
            f"train.steps={cfg.train.steps}; expected warmup_steps <= steps"
        )
    if int(cfg.train.get("max_consecutive_skips", 0)) < 0:
        raise ConfigError(
            f"train.max_consecutive_skips={cfg.train.max_consecutive_skips}; "
            "expected an integer >= 0 (0: never stop)"
        )
