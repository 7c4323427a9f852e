"""Trainable and total parameter counts of PEFT methods on model configs,
from shapes only (`jax.eval_shape`: no weights allocated), as a markdown table.
`scripts/count_params.py` prints it; the LoRA paper's counts are checked
against it (`experiments/lora_paper/param_counts.py`).

A counting config holds `settings` (name -> {title, model: ModelConfig fields
or hf_config: path to a config.json, method: a PEFT method config, expected,
paper}) and `rows`, the comma-separated names to print. A training config
(`model` + `method`) is counted as one row: its model (random-init fields, or
the config.json of a local `model.checkpoint`) under its method.
"""

from __future__ import annotations

import os


def _scannable(model_type) -> bool:
    from ftjax.models.registry import get_family, model_types

    return model_type not in model_types() or get_family(model_type).scannable


def model_config(setting, name: str = "setting"):
    from ftjax.errors import ConfigError
    from ftjax.models import ModelConfig
    from ftjax.models.hf import config_from_hf, read_config

    if setting.get("hf_config"):
        path = setting["hf_config"]
        hf = read_config(os.path.dirname(path) or ".")
        return config_from_hf(hf, path, scan_layers=_scannable(hf.get("model_type")))
    if not setting.get("model"):
        raise ConfigError(f"{name}: no 'model' (ModelConfig fields) or 'hf_config'; expected one")
    # Scanned layers trace one layer instead of all: the counts are identical
    # (a setting whose method addresses single layers sets scan_layers=False).
    try:
        fields = dict(setting["model"])
        scan = _scannable(fields.get("model_type", "llama"))
        return ModelConfig(**{"scan_layers": scan, **fields})
    except TypeError as e:
        raise ConfigError(f"{name}.model: {e}; expected ModelConfig fields") from None


def count_setting(setting, name: str = "setting") -> tuple[int, int]:
    """(trainable, total) for one setting, from shapes only."""
    import jax

    from ftjax import peft
    from ftjax.errors import ConfigError
    from ftjax.models.hf import abstract_params

    cfg = model_config(setting, name)
    if not setting.get("method"):
        raise ConfigError(f"{name}: no 'method' (a PEFT method config); expected one")
    method = peft.build_method(setting["method"])
    abstract = abstract_params(cfg)
    adapted = jax.eval_shape(lambda p: method.apply(p, jax.random.key(0)), abstract)
    return method.count(adapted)


def training_settings(config) -> tuple[dict, list[str]]:
    """A training config as one counting setting: its model and its method."""
    from ftjax.errors import ConfigError

    mcfg, method = config.model, config.method.to_dict()
    if mcfg.get("checkpoint"):
        ckpt = mcfg.checkpoint
        if not os.path.isdir(ckpt):
            raise ConfigError(
                f"model.checkpoint={ckpt!r}: count_params reads config.json from a local "
                "checkpoint directory; expected a directory"
            )
        model = {"hf_config": os.path.join(ckpt, "config.json")}
    else:
        model = {"model": mcfg.init.to_dict()}
    name = method.get("name", "method")
    return {name: {"title": f"{name} (training config)", "method": method, **model}}, [name]


def table(config) -> tuple[str, list[str]]:
    """The markdown table and the names of rows that missed their expected count."""
    from ftjax.errors import ConfigError

    keys = set(config.keys())
    if {"settings", "rows"} <= keys:
        settings = {k: v.to_dict() for k, v in config.settings.items()}
        rows = [r.strip() for r in config.rows.split(",") if r.strip()]
    elif {"model", "method"} <= keys:
        settings, rows = training_settings(config)
    else:
        raise ConfigError(
            f"--config: has fields {', '.join(sorted(keys)) or '(none)'}; expected a counting "
            "config (settings + rows, e.g. experiments/lora_paper/param_counts.py) or a "
            "training config (model + method)"
        )
    lines = [
        "| setting | trainable | expected | paper | total | trainable % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    missed = []
    for name in rows:
        if name not in settings:
            raise ConfigError(f"rows: unknown setting {name!r}; known: {', '.join(settings)}")
        setting = settings[name]
        trainable, total = count_setting(setting, f"settings.{name}")
        expected = setting.get("expected")
        mark = ""
        if expected is not None and trainable != expected:
            mark = " (MISMATCH)"
            missed.append(name)
        lines.append(
            f"| {setting.get('title', name)} | {trainable:,}{mark} | "
            f"{'' if expected is None else f'{expected:,}'} | {setting.get('paper', '')} | "
            f"{total:,} | {100.0 * trainable / total:.4f} |"
        )
    return "\n".join(lines), missed
