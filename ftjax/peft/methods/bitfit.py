"""BitFit (Ben Zaken et al., 2022): only the biases train. In a model without
biases (Llama) the norm scales train instead, so that the method still means
"a few vectors, no matrices"."""

from __future__ import annotations

from collections.abc import Sequence

from ftjax.peft.registry import MethodSpec, register


def select_biases(paths: Sequence[str]) -> set[str]:
    biases = {p for p in paths if p.endswith("/bias")}
    if biases:
        return biases
    return {p for p in paths if p.endswith("/scale")}


def _build(opts):
    del opts
    return (lambda params, rng: params), select_biases


SPEC = register(
    MethodSpec(
        name="bitfit",
        options={},
        build=_build,
        lr_scale=10.0,
        no_export="HF PEFT has no BitFit adapter type: export the merged HF weights instead",
        doc="biases (or norm scales) train",
    )
)
