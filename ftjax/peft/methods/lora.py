"""LoRA (Hu et al., 2021) as a method: every targeted kernel becomes a
`LoraWeight` leaf (`ftjax.peft.lora`); only the adapters train. The shared
options and `adapter_apply` also serve DoRA and QLoRA.

The study preset `pissa` is LoRA with PiSSA's initialization (Meng et al.,
2024) at alpha = rank, so that the scale is 1.

Two training-time variants are options, and their adapters export as plain
LoRA: LoRA+ (Hayou et al., 2024), `loraplus_ratio`, trains `b` at that
multiple of the learning rate (the paper recommends 16; the optimizer applies
it, see `MethodSpec.lr_scales`); LoRA-FA (Zhang et al., 2023), `fa`, keeps
`a` frozen at its random init so that only `b` trains (`LoraWeight.freeze_a`:
`split` gives `a` no gradient and no optimizer state).

PEFT's LoraConfig fields of the same names are options too, with PEFT's
meaning (`ftjax.peft.lora_fields`): `rank_pattern` / `alpha_pattern` (module
regex -> rank / alpha), `bias` (none | lora_only | all: those biases train),
`modules_to_save` (modules that train in full, e.g. `lm_head`; never LoRA
targets) and `layers_to_transform` / `layers_pattern` (only those decoder
layers are adapted; refused on scanned layers, whose one stacked kernel holds
every layer's adapter)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax

from ftjax.peft import lora_fields, tree
from ftjax.peft import targets as targets_lib
from ftjax.peft.base import PeftError
from ftjax.peft.lora import INITS, check_compute, check_init, init_lora, lora_scale
from ftjax.peft.registry import MethodSpec, Option, parse_bool, register, register_preset

LORA_OPTIONS = {
    "rank": Option(8, int, "adapter rank r"),
    "alpha": Option(16.0, float, "scale numerator: alpha / r (or alpha / sqrt(r) with rslora)"),
    "rslora": Option(False, parse_bool, "rank-stabilized scale alpha / sqrt(r)"),
    "dropout": Option(0.0, float, "dropout on the adapter's input"),
    "init": Option("kaiming", str, f"initialization of a: {' | '.join(INITS)}"),
    "targets": Option("qv", str, "preset, regex or module names (ftjax.peft.targets)"),
    "compute": Option("auto", str, "auto | factored | merged | hybrid (ftjax.peft.lora)"),
    "dtype": Option(None, str, "adapter dtype (default: the kernel's)"),
    "loraplus_ratio": Option(1.0, float, "LoRA+: b's learning rate / a's (paper: 16; 1 = off)"),
    "fa": Option(False, parse_bool, "LoRA-FA: a frozen at its init, only b trains"),
    # Kept as JSON text in configs (a ConfigDict refuses dotted keys).
    "rank_pattern": Option(None, str, "module regex -> rank (PEFT's rank_pattern; a dict or JSON)"),
    "alpha_pattern": Option(None, str, "module regex -> alpha (a dict or JSON)"),
    "bias": Option("none", str, "none | lora_only | all: biases that train with the adapters"),
    "modules_to_save": Option(None, str, "module name(s) that train in full, e.g. lm_head"),
    "layers_to_transform": Option(None, json.loads, "decoder layer index or list to adapt"),
    "layers_pattern": Option(None, str, "the layer stack's name (layers, h), as PEFT's"),
}
# Where a study starts LoRA-family methods: every linear layer, alpha = 2r,
# and a learning rate 10x full tuning's, as in the LoRA and QLoRA papers.
LORA_STUDY = {"rank": 16, "alpha": 32.0, "targets": "all-linear"}


def check_lora_options(opts):
    rank = opts["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise PeftError(f"method.rank: must be a positive integer, got {rank!r}")
    if not 0.0 <= float(opts["dropout"]) < 1.0:
        raise PeftError(f"method.dropout: must be in [0, 1), got {opts['dropout']!r}")
    check_init(opts["init"])
    lora_fields.check_options(opts)
    check_compute(opts["compute"], float(opts["dropout"]))
    ratio = opts["loraplus_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise PeftError(f"method.loraplus_ratio: must be a positive number, got {ratio!r}")
    if not isinstance(opts["fa"], bool):
        raise PeftError(f"method.fa: must be a bool, got {opts['fa']!r}")
    spec = opts["targets"]
    if not isinstance(spec, str) and not (
        isinstance(spec, Sequence) and all(isinstance(s, str) for s in spec)
    ):
        raise PeftError(f"method.targets: expected a preset, a regex or module names, got {spec!r}")


def describe_lora(opts) -> list[str]:
    parts = [f"r={opts['rank']}", str(opts["targets"])]
    if opts.get("init") not in (None, "kaiming"):
        parts.append(f"init={opts['init']}")
    if opts.get("rslora"):
        parts.append("rslora")
    if opts.get("loraplus_ratio", 1.0) != 1.0:
        parts.append(f"lora+{opts['loraplus_ratio']:g}")
    if opts.get("fa"):
        parts.append("fa")
    if opts.get("rank_pattern") or opts.get("alpha_pattern"):
        parts.append("patterns")
    if opts.get("bias", "none") != "none":
        parts.append(f"bias={opts['bias']}")
    if opts.get("modules_to_save"):
        parts.append("save=" + "+".join(lora_fields.as_list(opts["modules_to_save"])))
    if opts.get("layers_to_transform") is not None:
        parts.append(f"layers={opts['layers_to_transform']}")
    return parts


def loraplus_scales(opts) -> dict[str, float]:
    """LoRA+: `b` at `loraplus_ratio` times the learning rate (nothing when 1)."""
    ratio = float(opts.get("loraplus_ratio", 1.0))
    return {} if ratio == 1.0 else {"b": ratio}


def adapter_apply(opts, wrap=None, quantized_spec=None, double_quant=True):
    """`apply(params, rng)` that puts a LoRA leaf on every target. `wrap(leaf)`
    turns it into another leaf kind (DoRA); with `quantized_spec` the matched
    kernels' bases become NF4 (QLoRA), after init, so that PiSSA's residual (not
    W) is what gets quantized, as in the PiSSA paper's QPiSSA."""
    from ftjax.peft.quant import quantize_nf4

    def apply(params, rng):
        flat = dict(tree.flatten_paths(params))
        lora_fields.saved_paths(flat, opts)  # names that match nothing are refused here
        planned = lora_fields.plan(targets_lib.select(params, opts["targets"]), flat, opts)
        paths = [p for p, _, _ in planned]
        quantized = set()
        if quantized_spec is not None:
            quantized = set(targets_lib.select(params, quantized_spec, field="method.quantize"))
            _check_bias_with_quantized(opts, quantized - set(paths), flat)
        new = {}
        for i, (path, rank, alpha) in enumerate(planned):
            leaf = init_lora(
                jax.random.fold_in(rng, i),
                flat[path],
                rank,
                scale=lora_scale(alpha, rank, opts["rslora"]),
                init=opts["init"],
                dropout=float(opts["dropout"]),
                compute=opts["compute"],
                dtype=opts["dtype"],
                path=path,
                freeze_a=bool(opts.get("fa", False)),
            )
            if path in quantized:
                leaf = leaf.replace(w=quantize_nf4(leaf.w, double_quant=double_quant))
            new[path] = wrap(leaf) if wrap else leaf
        for path in quantized - set(paths):
            new[path] = quantize_nf4(flat[path], double_quant=double_quant)
        return tree.replace_leaves(params, new)

    return apply


def _check_bias_with_quantized(opts, quantized_only, flat):
    # A selector sees plain paths only: an NF4 kernel without an adapter would
    # look adapted, and its bias would train under "lora_only".
    if opts.get("bias", "none") != "lora_only":
        return
    clash = [p for p in quantized_only if p[: -len("kernel")] + "bias" in flat]
    if clash:
        raise PeftError(
            f"method.bias: 'lora_only' with kernels quantized but not adapted ({clash[0]}); "
            "set quantize to the targets, or bias to 'none' or 'all'"
        )


def select_trained(opts):
    """The selector of a LoRA-family method: the plain parameters that train
    besides the adapters (`bias`, `modules_to_save`; none by default)."""
    return lambda paths: lora_fields.trained_plain(paths, opts)


def export_adapter(model_cfg, params, out_dir, opts, initial=None) -> dict:
    """HF PEFT adapter files (`ftjax.peft.peft_format.export_adapter`); PiSSA
    leaves are rewritten as a LoRA over `initial`, the original base."""
    from ftjax.peft.peft_format import export_adapter as export

    return export(model_cfg, params, out_dir, method=opts, initial=initial)


def _build(opts):
    return adapter_apply(opts), select_trained(opts)


def lora_family_spec(name: str, build, options=LORA_OPTIONS, doc: str = "") -> MethodSpec:
    """The spec of a LoRA-family method (LoRA, DoRA, QLoRA): LoRA's checks,
    label, study preset and HF PEFT export, its own options and leaves."""
    return MethodSpec(
        name=name,
        options=options,
        build=build,
        check=check_lora_options,
        describe=describe_lora,
        study=LORA_STUDY,
        lr_scale=10.0,
        export=export_adapter,
        doc=doc,
        lr_scales=loraplus_scales,
    )


SPEC = register(
    lora_family_spec(
        "lora", _build, doc="low-rank adapters y += s * x @ a @ b on the targeted kernels"
    )
)
register_preset("pissa", "lora", {**LORA_STUDY, "alpha": 16.0, "init": "pissa"}, lr_scale=2.0)
