"""The run config: one ConfigDict with model, method, data, optim, train,
parallel sections. Experiment files start from `default_config()` and change
only what they name."""

from __future__ import annotations

import dataclasses

import ml_collections

from ftjax.errors import ConfigError, FtjaxError
from ftjax.models import ModelConfig
from ftjax.models.config import ATTENTION_KERNELS, REMAT_POLICIES
from ftjax.train.optim import default_optim_config, validate_optim_config
from ftjax.train.parallel import MODES

# ModelConfig fields that say how the model runs, not what it is: set in the
# `model` section (for a checkpoint and a random init alike), never in `model.init`.
EXECUTION_OPTIONS = ("dtype", "param_dtype", "scan_layers", "remat", "attention", "task",
                     "num_labels")  # fmt: skip
DTYPES = ("float32", "bfloat16", "float16")


def default_model_config() -> ml_collections.ConfigDict:
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    init = {
        k: v
        for k, v in defaults.items()
        if k not in EXECUTION_OPTIONS + ("rope_scaling", "head_dim", "sliding_window")
    }
    return ml_collections.ConfigDict(
        dict(
            # A local HF checkpoint dir or a hub id; empty = random init from `init`.
            checkpoint="",
            # The architecture of a random init (ModelConfig fields); not used
            # with a checkpoint, whose config.json decides it.
            init=init,
            dtype="float32",  # compute dtype (bfloat16 for mixed precision)
            param_dtype="float32",  # master weights and optimizer state
            scan_layers=False,
            remat="none",  # none | full | dots | attention | offload | full_offload (REMAT_POLICIES)
            attention=defaults["attention"],  # auto | block | xla | splash | cudnn (ModelConfig)
            # The head fine-tuning trains ("" : the checkpoint's own, or none for a
            # random init): sequence_classification (num_labels 1: regression) or
            # token_classification on an encoder; a head the checkpoint lacks starts
            # from train.seed, as transformers' heads start random.
            task="",
            num_labels=0,
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
            # Positions per chunk of the chunked cross-entropy (ftjax.train.loss):
            # -1 auto (chunks only where one sequence's float32 logits exceed
            # 64 MiB), 0 dense logits always, N > 0 chunks of N positions.
            loss_chunk=-1,
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
            # Keep the optimizer state in host memory between steps (moved to the
            # device inside the step): frees its HBM for activations.
            offload_optimizer=False,
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


# A run's `resources` section: what a cluster sweep backend (ftjax.study.ray_backend)
# gives each of its processes, and how many hosts (processes) it takes.
RESOURCE_DEFAULTS = dict(cpus=1, gpus=0, tpu_chips=0, hosts=1, tpu_version="", tpu_topology="")


def run_resources(cfg, name: str = "resources") -> dict:
    """The `resources` section of a run config over `RESOURCE_DEFAULTS`,
    checked field by field."""
    given = dict(cfg.get("resources") or {})
    unknown = sorted(set(given) - set(RESOURCE_DEFAULTS))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown field; fields: "
                          f"{', '.join(RESOURCE_DEFAULTS)}")  # fmt: skip
    out = {**RESOURCE_DEFAULTS, **given}
    for key in ("cpus", "gpus", "tpu_chips", "hosts"):
        v = out[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        if not ok or (key in ("cpus", "hosts") and v < 1):
            raise ConfigError(f"{name}.{key}={v!r}; expected a number >= "
                              f"{1 if key in ('cpus', 'hosts') else 0}")  # fmt: skip
    for key, example in (("tpu_version", "v4"), ("tpu_topology", "2x2x2")):
        if not isinstance(out[key], str):
            raise ConfigError(f"{name}.{key}={out[key]!r}; expected e.g. {example!r} or ''")
    if bool(out["tpu_version"]) != bool(out["tpu_topology"]):
        raise ConfigError(
            f"{name}: tpu_version={out['tpu_version']!r} and tpu_topology="
            f"{out['tpu_topology']!r}; a TPU slice needs both (e.g. 'v4' and '2x2x2') or neither"
        )
    return out


# ----------------------------------------------------------------------------- validation

# Sections a run config may hold besides its own: the study layer's (read by
# `ftjax.study`, which checks them).
STUDY_SECTIONS = ("eval", "study", "resources")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _type_ok(value, default) -> bool:
    """`value` has the type of the default (an int where a float is expected too)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return _is_int(value)
    if isinstance(default, float):
        return _is_number(value)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def _type_name(default) -> str:
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(
        type(default), type(default).__name__
    )


def check_fields(section: str, cfg, defaults, skip=()) -> None:
    """Every field of `cfg` is one of `defaults` and has its type."""
    for key in cfg.keys():
        if key in skip:
            continue
        if key not in defaults:
            raise ConfigError(
                f"{section}.{key}: no such field; fields of {section}: "
                f"{', '.join(sorted(defaults.keys()))}"
            )
        value, default = cfg[key], defaults[key]
        if not _type_ok(value, default):
            raise ConfigError(f"{section}.{key}={value!r}; expected {_type_name(default)}")


def _check_range(section: str, cfg, key: str, lo, expected: str, hi=None) -> None:
    value = cfg[key]
    if value < lo or (hi is not None and value >= hi):
        raise ConfigError(f"{section}.{key}={value!r}; expected {expected}")


def _init_dict(mcfg) -> dict:
    init = mcfg.get("init") or {}
    return dict(init.to_dict() if hasattr(init, "to_dict") else init)


def execution_options(mcfg) -> dict:
    """The `model` section's execution options (dtype, param_dtype, scan_layers,
    remat, attention), as ModelConfig keyword arguments. The config.json of
    older runs held them in `model.init`: a value found only there is used."""
    defaults, init = default_model_config(), _init_dict(mcfg)
    options = {k: mcfg[k] if k in mcfg else init.get(k, defaults[k]) for k in EXECUTION_OPTIONS}
    options["remat"] = _remat_name(options["remat"])
    return options


def _remat_name(value):
    """`model.remat` as a policy name; configs before the policies held a bool."""
    if isinstance(value, bool):
        return "full" if value else "none"
    return value


def init_fields(mcfg) -> dict:
    """The architecture fields of `model.init` (execution options left out:
    `validate_model_config` refuses one there that conflicts with the `model`
    section)."""
    return {k: v for k, v in _init_dict(mcfg).items() if k not in EXECUTION_OPTIONS}


def _model_config_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def validate_model_config(mcfg) -> None:
    """The model section: dtype names, the attention kernel, the execution
    options, and `model.init` fields that are ModelConfig fields (a random
    init's architecture is built here, so its own checks run too)."""
    defaults = default_model_config()
    check_fields("model", mcfg, defaults, skip=("init", "remat"))
    remat = execution_options(mcfg)["remat"]
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"model.remat={remat!r}; expected one of {', '.join(REMAT_POLICIES)}")
    for key in ("dtype", "param_dtype"):
        if mcfg.get(key, defaults[key]) not in DTYPES:
            raise ConfigError(f"model.{key}={mcfg.get(key)!r}; expected one of {', '.join(DTYPES)}")
    attention = execution_options(mcfg)["attention"]
    if attention not in ATTENTION_KERNELS:
        raise ConfigError(
            f"model.attention={attention!r}; expected one of {', '.join(ATTENTION_KERNELS)}"
        )
    fields, init, options = _model_config_defaults(), _init_dict(mcfg), execution_options(mcfg)
    for key in init:
        if key not in fields:
            raise ConfigError(
                f"model.init.{key}: not a model field; fields: "
                f"{', '.join(k for k in fields if k not in EXECUTION_OPTIONS)}"
            )
        if key in EXECUTION_OPTIONS:
            value, model_value = init[key], options[key]
            if key == "remat":
                value = _remat_name(value)
            if value != model_value and value != fields[key]:
                raise ConfigError(
                    f"model.init.{key}={value!r} conflicts with model.{key}={model_value!r}; "
                    f"set model.{key} (model.init holds the architecture only)"
                )
        elif fields[key] is not None and not _type_ok(init[key], fields[key]):
            raise ConfigError(f"model.init.{key}={init[key]!r}; expected {_type_name(fields[key])}")
    if not mcfg.checkpoint:
        try:
            ModelConfig(**init_fields(mcfg), **execution_options(mcfg))
        except FtjaxError as e:
            raise ConfigError(f"model.init: {e}") from None


def ignored_init_fields(mcfg, model_cfg) -> str | None:
    """With a checkpoint, `model.init` is not used: the checkpoint's config
    decides the architecture. A line naming the `model.init` fields set away
    from their defaults that the checkpoint's config (`model_cfg`) does not
    share, for a warning; None when there are none."""
    fields = _model_config_defaults()
    differ = [
        f"{key}={value!r} (checkpoint: {getattr(model_cfg, key)!r})"
        for key, value in init_fields(mcfg).items()
        if key in fields and value != fields[key] and getattr(model_cfg, key) != value
    ]
    if not differ:
        return None
    return (
        f"model.init is not used with model.checkpoint={mcfg.checkpoint!r}, whose config "
        f"decides the architecture: ignored model.init.{', '.join(differ)}"
    )


def validate_train_config(tcfg) -> None:
    check_fields("train", tcfg, default_train_config())
    s = "train"
    _check_range(s, tcfg, "steps", 1, "a positive integer")
    _check_range(s, tcfg, "log_every", 1, "a positive integer")
    _check_range(s, tcfg, "keep", 1, "an integer >= 1 (checkpoints kept)")
    for key in ("eval_every", "eval_max_batches", "checkpoint_every"):
        _check_range(s, tcfg, key, 0, "an integer >= 0 (0: off)")
    _check_range(s, tcfg, "max_consecutive_skips", 0, "an integer >= 0 (0: never stop)")
    _check_range(s, tcfg, "z_loss", 0, "a number >= 0")
    _check_range(s, tcfg, "label_smoothing", 0, "a number in [0, 1)", hi=1)
    _check_range(s, tcfg, "loss_chunk", -1, "-1 (auto), 0 (dense) or a chunk length > 0")
    _check_range(s, tcfg, "peak_flops", 0, "a number >= 0 (0: no MFU)")
    if tcfg.best_mode not in ("min", "max"):
        raise ConfigError(f"train.best_mode={tcfg.best_mode!r}; expected 'min' or 'max'")


def validate_parallel_config(pcfg) -> None:
    check_fields("parallel", pcfg, default_parallel_config())
    if pcfg.mode not in MODES:
        raise ConfigError(f"parallel.mode={pcfg.mode!r}; expected one of {', '.join(MODES)}")
    _check_range("parallel", pcfg, "model_parallel", 0, "an integer >= 1 (0: automatic)")
    if pcfg.model_parallel and pcfg.mode != "tensor":
        raise ConfigError(
            f"parallel.model_parallel={pcfg.model_parallel} applies to parallel.mode='tensor' "
            f"only, not {pcfg.mode!r}; expected 0"
        )
    if pcfg.offload_optimizer and pcfg.mode == "pmap":
        raise ConfigError(
            "parallel.offload_optimizer=True needs a sharded mode (single, data, fsdp or "
            "tensor), not parallel.mode='pmap'"
        )
    if pcfg.coordinator_address:
        if pcfg.num_processes < 1:
            raise ConfigError(
                f"parallel.num_processes={pcfg.num_processes}; expected >= 1 with "
                "parallel.coordinator_address set"
            )
        if not 0 <= pcfg.process_id < pcfg.num_processes:
            raise ConfigError(
                f"parallel.process_id={pcfg.process_id}; expected 0 <= process_id < "
                f"num_processes={pcfg.num_processes}"
            )


def check_devices(cfg, num_devices: int) -> None:
    """Batch divisibility once the device count is known (before any model or
    data is loaded); the same checks `Parallel.check_batch_size` makes."""
    mode, accum, batch = cfg.parallel.mode, int(cfg.optim.accum_steps), int(cfg.data.batch_size)
    mp = int(cfg.parallel.model_parallel)
    if mode == "tensor":
        if mp and num_devices % mp:
            raise ConfigError(
                f"parallel.model_parallel={mp} does not divide the {num_devices} devices"
            )
        data_parallel = num_devices // mp if mp else None  # auto: known with the model
    else:
        data_parallel = 1 if mode == "single" else num_devices
    if data_parallel and (batch // accum) % data_parallel:
        raise ConfigError(
            f"data.batch_size={batch} (micro-batch {batch // accum}) is not divisible by "
            f"the {data_parallel} data-parallel devices of parallel.mode={mode}"
        )


def validate_run_config(cfg) -> None:
    """The whole config, before any model or data is loaded: section and field
    names, types and ranges, the optimizer, the method's options (through the
    method registry), the parallel settings and the data config. Each failure
    is one line naming the field (a `ConfigError`, `PeftError` or
    `DataConfigError`), e.g. with `cfg.optim.name = "adam"`:

        ConfigError: optim.name='adam'; expected one of adamw, adafactor, lion, sgd
    """
    from ftjax.data import validate_data_config
    from ftjax.peft import registry

    known = ("model", "method", "data", "optim", "train", "parallel") + STUDY_SECTIONS
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(f"{key}: no such config section; sections: {', '.join(known)}")
    for key in known[:6]:
        if key not in cfg:
            raise ConfigError(
                f"{key}: the config has no {key} section; start from default_config()"
            )
    validate_model_config(cfg.model)
    validate_train_config(cfg.train)
    validate_optim_config(cfg.optim, int(cfg.train.steps))
    validate_parallel_config(cfg.parallel)
    registry.resolve_config(cfg.method)
    validate_data_config(cfg.data)
    if "resources" in cfg:
        run_resources(cfg)
    if int(cfg.data.batch_size) % int(cfg.optim.accum_steps):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by "
            f"optim.accum_steps={cfg.optim.accum_steps}"
        )
    if not cfg.model.checkpoint:
        limit = int(cfg.model.init.max_position_embeddings)
        if int(cfg.data.seq_len) > limit:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len} is longer than the model's "
                f"model.init.max_position_embeddings={limit}; expected seq_len <= {limit}"
            )
