"""Pure functions over an adapted params tree: split, combine, merge, count.

Design. `split(params)` returns two trees, `trainable` and `frozen`, with the
*same structure* as `params`; an entry that lives in the other tree is `None`.
Weight leaves are split child by child: a `LoraWeight(w, a, b)` becomes
`LoraWeight(None, a, b)` in `trainable` and `LoraWeight(w, None, None)` in
`frozen`; a leaf with nothing trainable (`NF4Weight`) is `None` in `trainable`.
Since `None` is an empty pytree, `jax.grad` with respect to `trainable` and an
optax state built on it hold buffers for the trainable arrays only: frozen
weights get no gradient and no optimizer state, by construction rather than by
a mask. `combine(trainable, frozen)` fills each tree's `None`s from the other.

Which *plain* arrays (embeddings, norms, biases, unadapted kernels) train is
the method's choice, not the tree's (a norm scale cannot carry a marker: the
model reads it as an array), so pass the method: `split(params, method)`.
Without one, `split(params)` infers the common cases: a tree holding adapter
leaves trains only their adapter parts (LoRA, DoRA, QLoRA); a tree without any
trains everything (full fine-tuning). BitFit and `freeze` need the method (or
`trainable=`, a regex on paths or a `path -> bool` predicate).

    >>> from ftjax import peft
    >>> method = peft.build_method({"name": "lora", "rank": 4, "targets": "qv"})
    >>> adapted = method.apply(params, jax.random.key(0))
    >>> trainable, frozen = peft.split(adapted, method)
    >>> len(jax.tree.leaves(trainable))   # a and b of 4 kernels; nothing else trains
    8
    >>> peft.count(adapted, method)   # (trainable, total); trainable: 2 x 4 x (32+32 + 32+16)
    (896, 22624)

(`params` in these examples: a tiny two-layer Llama's params, set up by
tests/test_doctests.py.) Gradients are then taken with respect to `trainable`
inside a loss that runs the model on `peft.combine(trainable, frozen)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

from ftjax.models import layers
from ftjax.peft.base import (
    PeftError,
    WeightLeaf,
    array_size,
    flatten_paths,
    is_leaf,
    path_str,
)
from ftjax.peft.targets import match_paths

# A selector gets every plain-array path and returns the trainable ones.
Selector = Callable[[Sequence[str]], "set[str] | Sequence[str]"]


def replace_leaves(params, new: dict):
    """`params` with the leaves at the given `/`-joined paths replaced."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
    return treedef.unflatten([new.get(path_str(kp), x) for kp, x in flat])


def has_adapters(params) -> bool:
    """True when the tree holds at least one weight leaf with trainable children."""
    return any(is_leaf(x) and x.trainable_names() for _, x in flatten_paths(params))


def selector(trainable, params) -> Selector:
    """Normalizes the `trainable=` argument of split/count (see module docstring)."""
    if hasattr(trainable, "select"):  # a Method
        return trainable.select
    if trainable is None:
        everything = not has_adapters(params)
        return lambda paths: set(paths) if everything else set()
    if isinstance(trainable, str):
        return lambda paths: set(match_paths(paths, trainable, field="trainable"))
    if callable(trainable):
        return lambda paths: {p for p in paths if trainable(p)}
    raise PeftError(f"trainable: expected None, a regex or a predicate, got {trainable!r}")


def split_with(params, select: Selector):
    """`split` with an explicit selector over plain-array paths (what methods pass)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: is_leaf(x) or x is None
    )
    paths = [path_str(kp) for kp, _ in flat]
    plain = [p for p, (_, x) in zip(paths, flat) if x is not None and not is_leaf(x)]
    chosen = set(select(plain))
    train, frozen = [], []
    for path, (_, x) in zip(paths, flat):
        if x is None:
            t, f = None, None
        elif is_leaf(x):
            t, f = x.split_parts()
        elif path in chosen:
            t, f = x, None
        else:
            t, f = None, x
        train.append(t)
        frozen.append(f)
    return treedef.unflatten(train), treedef.unflatten(frozen)


def split(params, trainable=None):
    """`(trainable, frozen)`: two trees shaped like `params`, `None` where absent.

    `trainable`: a `Method`, a regex, a `path -> bool` predicate or None (infer).

    >>> import jax.numpy as jnp
    >>> from ftjax.peft.lora import LoraWeight
    >>> w, a, b, s = jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), jnp.ones(3)
    >>> t, f = split({"k": LoraWeight(w, a, b, 2.0), "norm": s})
    >>> t["k"].w is None, t["k"].a is a, t["k"].b is b, t["norm"] is None
    (True, True, True, True)
    >>> f["k"].w is w, f["k"].a is None, f["k"].b is None, f["norm"] is s
    (True, True, True, True)
    """
    return split_with(params, selector(trainable, params))


def combine(trainable, frozen):
    """The full params tree from `split`'s two halves (`trainable` wins overlaps).

    Also puts a loaded subset back: `combine(subset, params)`.

    >>> from ftjax.peft import build_method
    >>> adapted = build_method({"name": "lora", "rank": 4}).apply(params, jax.random.key(0))
    >>> back = combine(*split(adapted))
    >>> all(x is y for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapted)))
    True
    """
    return jax.tree.map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


def merge(params):
    """Plain params again: every weight leaf replaced by its dense kernel (and
    a layer's bias by the one its leaf implies: IA3 scales key and value biases).

    The result runs in the model as is, or is saved with `save_pretrained`.

    >>> import jax.numpy as jnp
    >>> from ftjax.peft.lora import LoraWeight
    >>> leaf = LoraWeight(jnp.zeros((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), scale=0.5)
    >>> merge({"k": leaf})["k"]   # w + scale * a @ b
    Array([[0.5, 0.5],
           [0.5, 0.5]], dtype=float32)
    """
    return layers.materialize_params(params)


def count(params, trainable=None) -> tuple[int, int]:
    """`(trainable, total)` parameter counts (`trainable=` as in `split`).

    Works on `jax.ShapeDtypeStruct` trees (from `jax.eval_shape`). NF4 kernels
    count their logical size; adapters count in the total.

    >>> import jax.numpy as jnp
    >>> from ftjax.peft.lora import LoraWeight
    >>> leaf = LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), scale=1.0)
    >>> count({"k": leaf, "norm": jnp.ones(3)})   # a and b train; w and the norm do not
    (14, 29)
    """
    return count_with(params, selector(trainable, params))


def count_with(params, select: Selector) -> tuple[int, int]:
    t, f = split_with(params, select)
    n_train = _total(t)
    return n_train, n_train + _total(f)


def _total(tree) -> int:
    total = 0
    for _, x in flatten_paths(tree):
        total += x.param_counts()[1] if is_leaf(x) else array_size(x)
    return total


def nbytes(tree) -> int:
    """Bytes of every array in a tree (gradients, optimizer state, params)."""
    return sum(
        array_size(x) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")
    )


# ----------------------------------------------------------------------------- adapter files


def adapter_params(params, trainable=None) -> dict:
    """The trainable arrays only, as a plain nested dict (for small checkpoints).

    A weight leaf contributes a dict of its trainable children:
    `{"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": {"a": ..., "b": ...}}}}}}`.
    Put them back with `with_adapter_params(params, adapter)`.
    """
    return adapter_params_with(params, selector(trainable, params))


def adapter_params_with(params, select: Selector) -> dict:
    trainable, _ = split_with(params, select)
    out: dict = {}
    for path, x in flatten_paths(trainable):
        if is_leaf(x):
            for name in x.children:
                value = getattr(x, name)
                if value is not None:
                    _set(out, f"{path}/{name}", value)
        else:
            _set(out, path, x)
    return out


def _set(tree: dict, path: str, value):
    node = tree
    keys = path.split("/")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def with_adapter_params(params, adapter: dict):
    """`params` with the arrays of `adapter_params(...)` put back in place.

    `params` must have the same adapters (e.g. `method.apply(base, rng)` with the
    same config); every adapter array must find a same-shaped slot.
    """

    def put(node, sub, prefix):
        if isinstance(node, WeightLeaf):
            changes = {}
            for name, value in sub.items():
                if name not in node.children or isinstance(value, dict):
                    raise PeftError(
                        f"adapter: {prefix}/{name} has no slot in {type(node).__name__}"
                    )
                _check_shape(getattr(node, name), value, f"{prefix}/{name}")
                changes[name] = value
            return node.replace(**changes)
        if not isinstance(node, dict):
            if isinstance(sub, dict):
                raise PeftError(f"adapter: {prefix} is an array in params, a dict in the adapter")
            _check_shape(node, sub, prefix)
            return sub
        if not isinstance(sub, dict):
            raise PeftError(f"adapter: {prefix} is a subtree in params, an array in the adapter")
        out = dict(node)
        for key, value in sub.items():
            where = f"{prefix}/{key}" if prefix else key
            if key not in node:
                raise PeftError(f"adapter: {where} does not exist in params")
            out[key] = put(node[key], value, where)
        return out

    return put(params, adapter, "")


def _check_shape(slot, value, path):
    if slot is None or tuple(slot.shape) != tuple(value.shape):
        want = None if slot is None else tuple(slot.shape)
        raise PeftError(f"adapter: {path} has shape {tuple(value.shape)}, params expect {want}")
