"""What every ftjax.peft weight leaf shares, and the errors the package raises.

A weight leaf is a small immutable value type standing where a kernel stood in
the params tree. It implements the protocol of `ftjax.models.layers`
(`apply_linear`, `materialize`) and is a pytree whose *children* are arrays
(or other weight leaves) carrying the kernel's leading axes, so that `nn.scan`
slices them together with the layer, and whose *static* fields (scale, dropout
rate, compute mode, shapes) live in the pytree aux data. A subclass declares

    children           = ("w", "a", "b")     # pytree children, in order
    trainable_children = ("a", "b")          # what `split` puts in `trainable`
    static             = ("scale", ...)      # aux data: hashable, never traced

and nothing else about it needs to be known by `split`, `combine`, `merge` or
`count`. A child may be `None`: that is how `split` represents "this part lives
in the other tree" (see `ftjax.peft.tree`). An instance may freeze some of
its trainable children through a static field (a LoRA-FA leaf freezes `a`) by
overriding `trainable_names()`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from ftjax.errors import PeftError  # noqa: F401  (re-exported)


class UnknownMethodError(PeftError):
    """`name` is not a registered method."""


class TargetError(PeftError):
    """A target (or trainable) pattern matches no parameter."""


class RankError(PeftError):
    """A LoRA rank exceeds the smaller side of a target matrix."""


class AdapterFormatError(PeftError):
    """HF PEFT adapter files that are inconsistent or that ftjax cannot represent."""


class WeightLeaf:
    """Base class of adapter / quantized kernel leaves (see module docstring)."""

    children: ClassVar[tuple[str, ...]] = ()
    trainable_children: ClassVar[tuple[str, ...]] = ()
    static: ClassVar[tuple[str, ...]] = ()

    # -- pytree protocol ------------------------------------------------------------

    def _flatten_with_keys(self):
        kids = [(GetAttrKey(n), getattr(self, n)) for n in self.children]
        return kids, tuple(getattr(self, s) for s in self.static)

    def _flatten(self):
        return [getattr(self, n) for n in self.children], tuple(
            getattr(self, s) for s in self.static
        )

    @classmethod
    def _unflatten(cls, aux, kids):
        # Bypasses __init__: unflattening must accept None children (split trees)
        # and tracers, which constructor validation would reject.
        obj = object.__new__(cls)
        for name, value in zip(cls.children, kids):
            object.__setattr__(obj, name, value)
        for name, value in zip(cls.static, aux):
            object.__setattr__(obj, name, value)
        return obj

    def replace(self, **changes) -> WeightLeaf:
        """A copy with some children or static fields changed (no validation)."""
        unknown = set(changes) - set(self.children) - set(self.static)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        kids = [changes.get(n, getattr(self, n)) for n in self.children]
        aux = tuple(changes.get(s, getattr(self, s)) for s in self.static)
        return type(self)._unflatten(aux, kids)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable; use .replace({name}=...)")

    def _set(self, **fields):
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __repr__(self):
        def show(v):
            if v is None or isinstance(v, WeightLeaf):
                return repr(v)
            shape = getattr(v, "shape", None)
            return (
                f"{getattr(v, 'dtype', type(v).__name__)}{list(shape)}"
                if shape is not None
                else repr(v)
            )

        parts = [f"{n}={show(getattr(self, n))}" for n in self.children + self.static]
        return f"{type(self).__name__}({', '.join(parts)})"

    # -- the layers.py protocol, implemented by subclasses ------------------------

    def apply_linear(self, x, *, dtype, rng):  # pragma: no cover - abstract
        raise NotImplementedError

    def materialize(self, dtype=None):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- bookkeeping ----------------------------------------------------------------

    def trainable_names(self) -> tuple[str, ...]:
        """The children that train in this leaf: `trainable_children`, unless a
        static field of the instance freezes some (LoRA-FA's `a`)."""
        return self.trainable_children

    def split_parts(self) -> tuple[WeightLeaf | None, WeightLeaf | None]:
        """(trainable part, frozen part): two copies with the other side's children
        set to None; a side with no arrays at all is None itself."""
        names = self.trainable_names()
        train = {n: None for n in self.children if n not in names}
        frozen = {n: None for n in names}
        t = self.replace(**train) if names else None
        f = self.replace(**frozen) if len(names) < len(self.children) else None
        return t, f

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) number of parameters; None children count zero."""
        trainable = total = 0
        names = self.trainable_names()
        for name in self.children:
            child = getattr(self, name)
            if child is None:
                continue
            n = child.param_counts()[1] if isinstance(child, WeightLeaf) else array_size(child)
            total += n
            if name in names:
                trainable += n
        return trainable, total


def register_leaf(cls):
    """Class decorator: registers a `WeightLeaf` subclass as a pytree with keys."""
    jax.tree_util.register_pytree_with_keys(
        cls, cls._flatten_with_keys, cls._unflatten, flatten_func=cls._flatten
    )
    return cls


def is_leaf(x) -> bool:
    """True for ftjax.peft weight leaves (the `is_leaf` to stop tree traversal at)."""
    return isinstance(x, WeightLeaf)


def array_size(x) -> int:
    """Number of elements of an array or a `jax.ShapeDtypeStruct` (no data read)."""
    return math.prod(x.shape)


def key_name(k) -> str:
    if isinstance(k, DictKey):
        return str(k.key)
    if isinstance(k, GetAttrKey):
        return k.name
    if isinstance(k, SequenceKey):
        return str(k.idx)
    if isinstance(k, FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(keypath) -> str:
    """`model/layers_3/self_attn/q_proj/kernel` from a jax key path."""
    return "/".join(key_name(k) for k in keypath)


def flatten_paths(tree, *, keep_none: bool = False) -> list[tuple[str, Any]]:
    """[(path, leaf)] with weight leaves (and Nones, when asked) kept whole."""
    stop = (lambda x: is_leaf(x) or x is None) if keep_none else is_leaf
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)[0]
    return [(path_str(kp), leaf) for kp, leaf in leaves]
