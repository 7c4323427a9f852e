"""AdaLoRA's rank allocator as an optax transformation around the run's optimizer.

After each optimizer update, as HF PEFT's `RankAllocator.update_and_allocate`
does when called after `optimizer.step()` with `global_step` = the number
of updates made before this one (`t`, from 0):

1. Importance (while `t < total_step - tfinal`): for every entry of every
   `a`, `e`, `b`, the sensitivity `I = |w · ∇w|` (the updated weight times
   the gradient of this step) is smoothed, `Ī ← β₁ Ī + (1 − β₁) I`, and
   its uncertainty tracked, `Ū ← β₂ Ū + (1 − β₂) |I − Ī|`. An entry's score
   is `Ī · Ū`; a triplet's is its singular value's score plus the mean
   score of its column of `a` and of its row of `b`.
2. Budget: `init_r` triplets per adapted matrix until `tinit`, then the
   cubic decay `target + (init − target)(1 − (t − tinit)/(T − tfinal − tinit))³`
   (truncated to an integer; totals over all matrices), `target_r` per
   matrix from `T − tfinal` on, with `T = total_step`.
3. Masking, every `deltaT` steps after `tinit`: the `init − budget`
   triplets of lowest score (and any tied with the last of them) get their
   singular value set to exactly 0. At `t = T − tfinal` the final mask is
   drawn for the target budget, and from then on it is re-applied at every
   step, so pruned values stay 0 whatever the optimizer's momentum does.
   Between allocations a pruned triplet keeps training and may come back at
   the next one (the paper's and PEFT's behaviour).

The state (both averages, the last mask, the step) is a pytree inside the
optimizer state, so a checkpoint holds it and a resumed run allocates
exactly as an uninterrupted one. Budgets are tabulated on the host with
Python floats, so their integer truncation is PEFT's to the bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax.peft.adalora import AdaLoraWeight, is_adalora
from ftjax.peft.base import PeftError

CHILDREN = ("a", "e", "b")


@dataclasses.dataclass(frozen=True)
class RankSchedule:
    """PEFT's AdaLoRA schedule fields (`AdaLoraConfig`), `deltaT` as `delta_t`."""

    target_r: int
    total_step: int
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self):
        if not self.tinit < self.total_step - self.tfinal:
            raise PeftError(
                f"method.tinit: tinit={self.tinit} must be < total_step - tfinal = "
                f"{self.total_step} - {self.tfinal}, or there is no budgeting phase (as PEFT requires)"
            )

    @property
    def final_step(self) -> int:
        return self.total_step - self.tfinal

    def budget(self, step: int, init_bgt: int, target_bgt: int) -> int:
        """PEFT's `budget_schedule` budget at `step`, in Python arithmetic."""
        if step <= self.tinit:
            return init_bgt
        if step > self.final_step:
            return target_bgt
        left = 1 - (step - self.tinit) / (self.final_step - self.tinit)
        return int((init_bgt - target_bgt) * (left**3) + target_bgt)

    def budgets(self, init_bgt: int, target_bgt: int) -> np.ndarray:
        """`budget(t)` for t = 0 .. final_step (the table the update indexes)."""
        steps = range(self.final_step + 1)
        return np.asarray([self.budget(t, init_bgt, target_bgt) for t in steps], np.int64)


class AllocatorState(NamedTuple):
    """`inner`: the wrapped optimizer's state; `step`: updates made so far;
    `ipt_avg`, `unc_avg`: AdaLoRA-leaf-shaped trees (`w` None) of the
    smoothed sensitivity and uncertainty; `keep`: per AdaLoRA leaf, the last
    allocation's surviving triplets `(..., r)` (PEFT's `rank_pattern`)."""

    inner: Any
    step: jax.Array
    ipt_avg: Any
    unc_avg: Any
    keep: Any


def _on_adalora(fn, tree, *others):
    """`fn(leaf, *matching)` for each AdaLoRA leaf of `tree`; None elsewhere.
    `tree` is the params-shaped one: the others may hold None where it holds
    plain arrays, not the reverse."""
    return jax.tree.map(
        lambda x, *o: fn(x, *o) if is_adalora(x) else None, tree, *others, is_leaf=is_adalora
    )


def _zeros_like_leaf(leaf: AdaLoraWeight) -> AdaLoraWeight:
    return leaf.replace(
        w=None, **{c: jnp.zeros(jnp.shape(getattr(leaf, c)), jnp.float32) for c in CHILDREN}
    )


def init_allocator_state(params):
    """`(ipt_avg, unc_avg, keep)` at the start: zero averages, every triplet kept."""
    zeros = _on_adalora(_zeros_like_leaf, params)
    keep = _on_adalora(lambda x: jnp.ones(jnp.shape(x.e), bool), params)
    return zeros, jax.tree.map(jnp.copy, zeros), keep


def update_importance(ipt_avg, unc_avg, params, grads, beta1: float, beta2: float):
    """One step of PEFT's `update_ipt` on every AdaLoRA child: `params` the
    weights after this step's update, `grads` this step's gradient; returns
    the new `(ipt_avg, unc_avg)`."""

    def averages(p, g, avg, unc):
        out_avg, out_unc = {}, {}
        for c in CHILDREN:
            ipt = jnp.abs(jnp.asarray(getattr(p, c), jnp.float32) * getattr(g, c))
            out_avg[c] = beta1 * getattr(avg, c) + (1 - beta1) * ipt
            # The uncertainty is measured against the average just updated.
            out_unc[c] = beta2 * getattr(unc, c) + (1 - beta2) * jnp.abs(ipt - out_avg[c])
        return avg.replace(**out_avg), unc.replace(**out_unc)

    new_avg = _on_adalora(lambda *xs: averages(*xs)[0], params, grads, ipt_avg, unc_avg)
    new_unc = _on_adalora(lambda *xs: averages(*xs)[1], params, grads, ipt_avg, unc_avg)
    return new_avg, new_unc


def triplet_scores(ipt_avg, unc_avg):
    """Per AdaLoRA leaf, each triplet's importance `(..., r)`: `e`'s score
    plus the mean scores of `a`'s column (over inputs) and `b`'s row (over
    outputs), summed in PEFT's order."""

    def leaf(avg, unc):
        score = {c: getattr(avg, c) * getattr(unc, c) for c in CHILDREN}
        vectors = jnp.mean(score["a"], axis=-2) + jnp.mean(score["b"], axis=-1)
        return score["e"] + vectors

    return _on_adalora(leaf, ipt_avg, unc_avg)


def mask_to_budget(scores, excess):
    """`keep` trees: every triplet whose score is above the `excess`-th
    smallest of all (PEFT's `kthvalue` threshold, ties pruned); all kept
    when `excess` <= 0."""
    flat = jnp.concatenate([s.reshape(-1) for s in jax.tree.leaves(scores)])
    threshold = jnp.sort(flat)[jnp.clip(excess - 1, 0, flat.size - 1)]
    return jax.tree.map(lambda s: (s > threshold) | (excess <= 0), scores)


def allocation_step(schedule: RankSchedule, step, ipt_avg, unc_avg, keep, params, grads):
    """PEFT's `update_and_allocate` at global step `step` (traced), pure.

    `params`: the AdaLoRA leaves after this step's optimizer update, before
    masking; `grads`: this step's gradients. Returns `(ipt_avg, unc_avg,
    keep, mask_now)`: the new averages, the surviving triplets, and whether
    the `e` of pruned triplets is to be zeroed at this step."""
    es = [x.e for x in jax.tree.leaves(params, is_leaf=is_adalora) if is_adalora(x)]
    init_bgt = sum(int(np.prod(np.shape(e))) for e in es)
    target_bgt = schedule.target_r * sum(int(np.prod(np.shape(e)[:-1])) for e in es)
    table = jnp.asarray(schedule.budgets(init_bgt, target_bgt), jnp.int32)
    final = schedule.final_step
    budget = table[jnp.clip(step, 0, final)]

    budgeting = step < final
    new_avg, new_unc = update_importance(
        ipt_avg, unc_avg, params, grads, schedule.beta1, schedule.beta2
    )
    pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(budgeting, n, o), new, old)  # noqa: E731
    ipt_avg, unc_avg = pick(new_avg, ipt_avg), pick(new_unc, unc_avg)

    allocate = (budgeting & (step > schedule.tinit) & (step % schedule.delta_t == 0)) | (
        step == final
    )
    drawn = mask_to_budget(triplet_scores(ipt_avg, unc_avg), init_bgt - budget)
    keep = jax.tree.map(lambda d, k: jnp.where(allocate, d, k), drawn, keep)
    # PEFT resets the averages once the final mask is drawn (they are unused after).
    reset = lambda x: jnp.where(step == final, jnp.zeros_like(x), x)  # noqa: E731
    ipt_avg, unc_avg = jax.tree.map(reset, ipt_avg), jax.tree.map(reset, unc_avg)
    return ipt_avg, unc_avg, keep, allocate | (step > final)


def allocate_ranks(tx: optax.GradientTransformation, schedule: RankSchedule):
    """`tx` followed by AdaLoRA's rank allocation (see the module docstring).

    The wrapped update needs `params`; it returns `tx`'s updates, except
    that the `e` of a pruned triplet moves to exactly 0.

    >>> from ftjax.peft.adalora import AdaLoraWeight
    >>> leaf = AdaLoraWeight(None, jnp.ones((3, 4)), jnp.arange(1.0, 5.0), jnp.ones((4, 2)))
    >>> tx = allocate_ranks(optax.sgd(0.0), RankSchedule(target_r=1, total_step=2))
    >>> state = tx.init({"k": leaf})
    >>> grads = {"k": leaf.replace(e=jnp.asarray([1.0, 1.0, 1.0, 9.0]))}
    >>> updates, state = tx.update(grads, state, {"k": leaf})
    >>> optax.apply_updates({"k": leaf}, updates)["k"].e   # step 0 <= tinit: nothing pruned
    Array([1., 2., 3., 4.], dtype=float32)
    >>> updates, state = tx.update(grads, state, {"k": leaf})
    >>> optax.apply_updates({"k": leaf}, updates)["k"].e   # step 1: budget int(3 * 0.5**3 + 1) = 1
    Array([0., 0., 0., 4.], dtype=float32)
    """

    def init(params):
        ipt_avg, unc_avg, keep = init_allocator_state(params)
        return AllocatorState(tx.init(params), jnp.zeros((), jnp.int32), ipt_avg, unc_avg, keep)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("allocate_ranks: update needs params (AdaLoRA scores w * grad)")
        updates, inner = tx.update(grads, state.inner, params)
        stepped = optax.apply_updates(params, updates)
        ipt_avg, unc_avg, keep, mask_now = allocation_step(
            schedule, state.step, state.ipt_avg, state.unc_avg, state.keep, stepped, grads
        )

        def masked(u, p, k):
            # p + (-p) is exactly 0 in floating point: the pruned value lands on 0.
            e = jnp.where(mask_now & ~k, -jnp.asarray(p.e, u.e.dtype), u.e)
            return u.replace(e=e)

        updates = jax.tree.map(
            lambda u, p, k: masked(u, p, k) if is_adalora(u) else u,
            updates, params, keep, is_leaf=is_adalora,
        )  # fmt: skip
        return updates, AllocatorState(inner, state.step + 1, ipt_avg, unc_avg, keep)

    return optax.GradientTransformation(init, update)
