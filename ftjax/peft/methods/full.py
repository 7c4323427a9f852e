"""Full fine-tuning: every parameter trains. Its "adapter" is the whole model,
exported as merged HF weights (`save_pretrained`), not as PEFT files."""

from __future__ import annotations

from ftjax.peft.registry import MethodSpec, register


def _build(opts):
    del opts
    return (lambda params, rng: params), (lambda paths: set(paths))


SPEC = register(
    MethodSpec(
        name="full",
        options={},
        build=_build,
        no_export="full fine-tuning changes every weight: export the merged HF weights instead",
        doc="every parameter trains",
    )
)
