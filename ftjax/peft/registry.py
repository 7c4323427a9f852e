"""The registry of fine-tuning methods: a name -> everything ftjax knows about it.

A method is one module that describes itself once, in a `MethodSpec`, and
calls `register(spec)` at import. Everything that used to branch on method
names reads the spec instead: building the method from a config
(`build_method`), typed options from a study's `arg` string
(`parse_options`), the study presets and their learning-rate scale
(`preset`), the label a report prints (`label`), and the HF PEFT export (or
the reason there is none).

    >>> spec = get("lora")
    >>> sorted(spec.options)[:3]
    ['alpha', 'alpha_pattern', 'bias']
    >>> label({"name": "lora", "rank": 4, "targets": "qv"})
    'lora r=4 qv'

A method defined outside ftjax registers the same way (docs/peft.md, "Adding a
method"), and is then usable from any config as `method.name`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from ftjax.peft import task_head, tree
from ftjax.peft.base import PeftError, UnknownMethodError

# apply(params, rng) -> params with adapter leaves; select(paths) -> trainable plain paths.
ApplyFn = Callable[[Any, jax.Array], Any]


def parse_bool(text: str) -> bool:
    """A boolean option written in a config arg (`rslora=1`, `rslora=true`)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (1/0, true/false)")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a method: its default and how to read it from a string
    (the `arg` switch `method=lora,rank=16` gives strings)."""

    default: Any
    parse: Callable[[str], Any] = str
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What a method is, in one place.

    - `options`: name -> Option; a config may set only these.
    - `build(opts) -> (apply, select)`: the method's two pure functions from its
      resolved options (see `Method`).
    - `check(opts)`: raises PeftError naming `method.<option>` on a bad value.
    - `describe(opts) -> [str]`: what a report label adds after the name.
    - `study`: option values a study starts from (where they differ from the
      defaults), and `lr_scale`: its learning rate relative to full tuning's.
    - `export(model_cfg, params, out_dir, opts, initial) -> dict` writes HF PEFT
      adapter files; `None` with `no_export` saying why there are none.
    - `lr_scales(opts) -> {child: multiplier}`: learning rates of the named
      children of weight leaves relative to the run's (LoRA+: `{"b": 16.0}`);
      `ftjax.train.optim.build_optimizer` applies them.
    - `optimizer(opts, tx, schedule, total_steps, optim) -> tx`: the run's
      optimizer as this method needs it (GaLore rebuilds the run's AdamW, read
      from `optim`, the run's `optim` config, around projected gradients;
      AdaLoRA allocates ranks after the update); `None` keeps `tx` as built.
    - `penalty(opts) -> fn(trainable) -> scalar`: a term added to the
      training loss (AdaLoRA's orthogonality regularizer); `None` for none.
      The train step adds its gradient once per step, after the micro-batches.
    """

    name: str
    options: Mapping[str, Option]
    build: Callable[[dict], tuple[ApplyFn, tree.Selector]]
    check: Callable[[dict], None] = lambda opts: None
    describe: Callable[[dict], list[str]] = lambda opts: []
    study: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lr_scale: float = 1.0
    export: Callable[..., dict] | None = None
    no_export: str = ""
    doc: str = ""
    lr_scales: Callable[[dict], Mapping[str, float]] = lambda opts: {}
    optimizer: Callable[..., Any] | None = None
    penalty: Callable[[dict], Callable[[Any], Any]] | None = None

    def defaults(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items()}


class Preset(NamedTuple):
    """A study's name for a method with some options set (e.g. `pissa` is LoRA
    with `init="pissa"`), and its learning rate relative to full tuning's."""

    method: str
    options: Mapping[str, Any]
    lr_scale: float


class Method(NamedTuple):
    """A built method: its resolved config and its two pure functions."""

    name: str
    config: Mapping[str, Any]
    apply: ApplyFn
    select: tree.Selector

    def split(self, params):
        """`(trainable, frozen)` for this method (see `ftjax.peft.tree.split`)."""
        return tree.split_with(params, self.select)

    def count(self, params) -> tuple[int, int]:
        """`(trainable, total)` parameter counts under this method."""
        return tree.count_with(params, self.select)

    def adapter_params(self, params) -> dict:
        """The trainable arrays as a plain nested dict (small checkpoints)."""
        return tree.adapter_params_with(params, self.select)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by weight-leaf child name; `{}` when
        everything trains at the run's rate (see `MethodSpec.lr_scales`).

        >>> build_method({"name": "lora", "loraplus_ratio": 16}).lr_scales()
        {'b': 16.0}
        """
        return dict(get(self.name).lr_scales(self.config))

    def optimizer(self, tx, schedule, total_steps: int, optim=None):
        """The run's optimizer `tx` (built from the `optim` config) as this
        method trains with it (see `MethodSpec.optimizer`); `tx` itself for
        most methods."""
        wrap = get(self.name).optimizer
        if wrap is None:
            return tx
        return wrap(self.config, tx, schedule, int(total_steps), optim)

    def penalty(self):
        """`fn(trainable) -> scalar` added to the training loss, or None."""
        make = get(self.name).penalty
        return None if make is None else make(self.config)


_METHODS: dict[str, MethodSpec] = {}
_PRESETS: dict[str, Preset] = {}


def register(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Adds a method (and its study preset of the same name) to the registry."""
    if spec.name in _METHODS and not replace:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    _PRESETS[spec.name] = Preset(spec.name, dict(spec.study), spec.lr_scale)
    return spec


def unregister(name: str) -> None:
    """Removes a method and every study preset of it (tests of user methods)."""
    _METHODS.pop(name, None)
    for key in [k for k, p in _PRESETS.items() if p.method == name]:
        del _PRESETS[key]


def register_preset(name: str, method: str, options: Mapping[str, Any], lr_scale: float) -> None:
    """A named study preset of a registered method (`pissa` -> LoRA, init=pissa)."""
    get(method)
    _PRESETS[name] = Preset(method, dict(options), float(lr_scale))


def known_methods() -> tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_METHODS))


def known_presets() -> tuple[str, ...]:
    _load_builtin()
    return tuple(_PRESETS)


def get(name: str) -> MethodSpec:
    _load_builtin()
    if name not in _METHODS:
        raise UnknownMethodError(
            f"method.name: unknown method {name!r}; known: {', '.join(known_methods())}"
        )
    return _METHODS[name]


def preset(name: str) -> Preset:
    _load_builtin()
    if name not in _PRESETS:
        raise UnknownMethodError(f"method={name!r}; expected one of {', '.join(sorted(_PRESETS))}")
    return _PRESETS[name]


def parse_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Method options with string values converted by each option's parser;
    an option the method does not have is refused, naming the alternatives."""
    spec = get(method)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise PeftError(
            f"method.{unknown[0]}: not an option of method {method!r}; options: "
            f"{', '.join(sorted(spec.options)) or '(none)'}"
        )
    out = {}
    for key, value in options.items():
        if isinstance(value, str):
            try:
                value = spec.options[key].parse(value)
            except ValueError as e:
                raise PeftError(f"method.{key}={value!r}: {e}") from None
        out[key] = value
    return out


def resolve_config(config) -> dict[str, Any]:
    """The method config as a dict with defaults filled in, validated field by field."""
    if isinstance(config, str):
        config = {"name": config}
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        config = config.to_dict()
    config = dict(config)
    name = config.pop("name", None)
    spec = get(name)
    opts = {**spec.defaults(), **parse_options(name, config)}
    spec.check(opts)
    return {"name": name, **opts}


def build_method(config) -> Method:
    """Builds a method from a dict, an `ml_collections.ConfigDict` or a name.

    >>> build_method({"name": "lora", "rank": 4, "alpha": 8}).config["rank"]
    4
    """
    opts = resolve_config(config)
    apply, select = get(opts["name"]).build(opts)
    # A classification model's head trains under every method (ftjax.peft.task_head).
    return Method(opts["name"], opts, apply, task_head.with_head(select))


def label(config: Mapping[str, Any]) -> str:
    """How a report names a run of this method: the name and what sets it apart."""
    name = config.get("name", "?")
    if name not in known_methods():
        return str(name)
    opts = {**get(name).defaults(), **{k: v for k, v in config.items() if k != "name"}}
    return " ".join([name, *get(name).describe(opts)])


_BUILTIN_LOADED = False


def _load_builtin() -> None:
    """Imports ftjax's own method modules (each registers itself) on first use,
    so that `registry` has no import-time dependency on them."""
    global _BUILTIN_LOADED
    if not _BUILTIN_LOADED:
        _BUILTIN_LOADED = True
        import ftjax.peft.methods  # noqa: F401
