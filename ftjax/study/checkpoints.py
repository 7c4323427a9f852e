"""What a finished (or interrupted) run's checkpoint is used for after
training: evaluating it again, and exporting it to the PyTorch / Hugging Face
world. `scripts/evaluate.py` and `scripts/export.py` are flag parsers around
these two functions."""

from __future__ import annotations

import os

from ftjax.errors import ConfigError
from ftjax.rundir import RunDir, make_dirs, write_json_atomic

EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def evaluate_checkpoint(
    workdir: str, checkpoint: str = "latest", base_only: bool = False, out: str = ""
) -> tuple[dict, str]:
    """(metrics, path of the eval JSON) for checkpoint `checkpoint` of the run
    in `workdir` ("latest", "best" or a step), or for its base model with
    `base_only` (no checkpoint needed: the base comes from the run's config).
    The same evaluation as after training (`evaluate_run`); the run's
    summary.json is left as it is."""
    from ftjax.data import build_pipeline
    from ftjax.study.evaluate import default_eval_config, evaluate_run
    from ftjax.train.loop import RunResult
    from ftjax.train.restore import load_base_model, load_run_config, restore_run

    cfg = load_run_config(workdir)
    if out:  # a bad output path fails before anything is loaded
        make_dirs(os.path.dirname(out) or ".", "--out")
    if "eval" not in cfg:
        cfg.eval = default_eval_config()
    if base_only:
        model, base = load_base_model(cfg)
        params, step = base, None
        cfg.eval.analysis = False  # no update to analyse
    else:
        model, params, base, step = restore_run(cfg, workdir, checkpoint)
    pipeline = build_pipeline(cfg.data)
    out_dir = (os.path.dirname(out) or ".") if out else workdir
    result = RunResult({"checkpoint_step": step}, model, params, base, pipeline)
    metrics = evaluate_run(result, cfg, out_dir, update_summary=False,
                           extra={"checkpoint_step": step})  # fmt: skip
    path = out or RunDir(workdir).file("eval.json")
    if os.path.basename(path) != "eval.json":  # evaluate_run wrote <out_dir>/eval.json
        write_json_atomic(path, metrics)
    return metrics, path


def export_checkpoint(
    workdir: str, out_dir: str, checkpoint: str = "latest", dtype: str | None = None
) -> dict[str, str]:
    """Writes `<out_dir>/hf` (merged weights in HF layout, loadable by
    transformers) and, for methods with an HF PEFT export, `<out_dir>/adapter`
    (PiSSA rewritten as a LoRA over the original base). Returns what was
    written: {"step", "hf", "adapter" or "no_adapter" (why not)}."""
    from ftjax import peft
    from ftjax.models import save_pretrained
    from ftjax.peft import registry
    from ftjax.train.restore import load_run_config, restore_run

    if dtype and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype={dtype!r}; expected one of {', '.join(EXPORT_DTYPES)}")
    cfg = load_run_config(workdir)
    make_dirs(out_dir, "--out")  # before anything is loaded
    model, params, base_params, step = restore_run(cfg, workdir, checkpoint)
    written = {"step": step, "hf": os.path.join(out_dir, "hf")}
    save_pretrained(model, peft.merge(params), written["hf"], dtype=dtype or None)
    spec = registry.get(cfg.method.name)
    if spec.export is None:
        written["no_adapter"] = spec.no_export
    elif peft.has_adapters(params):
        written["adapter"] = os.path.join(out_dir, "adapter")
        method = registry.resolve_config(cfg.method)
        spec.export(model.cfg, params, written["adapter"], method, initial=base_params)
    return written
