"""The one place that compiles the train/eval step for a device layout.

Modes (`parallel.mode`):
  single  one device, plain `jax.jit`.
  data    `jax.jit` over a 1-D `data` mesh: batch sharded, state replicated.
  fsdp    as `data`, and every parameter and optimizer-state array is sharded
          over the same axis along its largest divisible dimension (ZeRO-3).
  tensor  a (`data`, `model`) mesh; Megatron-style rules shard the output
          features of q/k/v/gate/up (c_attn, c_fc) and the input features of
          o/down (c_proj) over `model`, so attention heads and the MLP hidden
          dimension are split; the batch is sharded over `data`. Each model
          family names those modules in its spec (`column_parallel`,
          `row_parallel`).
  pmap    data-parallel `jax.pmap`; gradients summed with `lax.psum`.

All modes compute the same numbers (tests check it on 8 simulated CPU
devices). Under several processes (`jax.distributed.initialize()`), each
process passes only its own rows of the global batch to `place_batch`.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftjax.errors import ConfigError
from ftjax.models import attention
from ftjax.models.registry import FamilySpec, get_family, module_regex
from ftjax.train.step import StepConfig, TrainState, eval_step, train_step

MODES = ("single", "data", "fsdp", "tensor", "pmap")


def _path(keypath) -> str:
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def fsdp_spec(shape, n: int, axis: str = "data") -> P:
    """Shard the largest dimension divisible by n; replicate small leaves."""
    if not shape or int(np.prod(shape)) < 2 * n:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % n == 0:
            return P(*[axis if j == i else None for j in range(len(shape))])
    return P()


def tensor_spec(path: str, shape, n: int, family: FamilySpec, axis: str = "model") -> P:
    """Megatron rules by parameter path, from the family's `column_parallel`
    and `row_parallel` module names; any child of an adapter leaf follows its
    kernel's rule on the axis it shares with the kernel (last for column,
    second-to-last for row), which GSPMD keeps correct for every child."""
    dims = [None] * len(shape)
    column = module_regex(tuple(family.column_parallel))
    row = module_regex(tuple(family.row_parallel))
    if column.search(path) and shape and shape[-1] % n == 0:
        dims[-1] = axis
    elif row.search(path) and len(shape) >= 2 and shape[-2] % n == 0 and "bias" not in path:
        dims[-2] = axis
    return P(*dims)


def _model_parallel_size(n: int, model_cfg, requested: int) -> int:
    if requested:
        return requested
    dims = [model_cfg.num_kv_heads, model_cfg.intermediate_size]
    return max(d for d in range(1, n + 1) if n % d == 0 and all(x % d == 0 for x in dims))


class Parallel:
    """Compiles and runs the step for one mode.

    Example::

        par = Parallel("fsdp", model, tx, StepConfig())
        state = par.place_state(state)
        state, metrics = par.train_step(state, par.place_batch(batch))
    """

    def __init__(
        self,
        mode,
        model,
        tx,
        step_cfg: StepConfig,
        model_parallel: int = 0,
        devices=None,
        offload_optimizer: bool = False,
    ):
        """`devices`: the devices to lay the step out on (default: all of
        `jax.devices()`); the planner passes a TPU topology's devices to
        compile for hardware that is not attached. `offload_optimizer`: the
        optimizer state lives in pinned host memory between steps."""
        if mode not in MODES:
            raise ConfigError(f"parallel.mode={mode!r}; expected one of {', '.join(MODES)}")
        if offload_optimizer and mode == "pmap":
            raise ConfigError("parallel.offload_optimizer=True is not available with mode='pmap'")
        self.offload_optimizer = offload_optimizer
        self.mode, self.model, self.tx, self.step_cfg = mode, model, tx, step_cfg
        devices = list(jax.devices() if devices is None else devices)
        self.devices = devices
        # Tracing reads the target platform (attention kernels differ by backend).
        self.platform = devices[0].platform
        self.num_devices = 1 if mode == "single" else len(devices)
        self.mesh = None
        if mode in ("data", "fsdp"):
            self.mesh = Mesh(np.array(devices), ("data",))
        elif mode == "tensor":
            m = _model_parallel_size(len(devices), model.cfg, model_parallel)
            if len(devices) % m:
                raise ConfigError(
                    f"parallel.model_parallel={m} does not divide the {len(devices)} devices"
                )
            self.mesh = Mesh(np.array(devices).reshape(-1, m), ("data", "model"))
        self._state_sharding = None
        self._compiled = None

    # ------------------------------------------------------------------ layout

    @property
    def data_parallel(self) -> int:
        """How many ways the batch is split (must divide the global batch)."""
        if self.mode == "single":
            return 1
        if self.mode == "pmap":
            return jax.device_count()
        return self.mesh.shape["data"]

    def check_batch_size(self, global_batch: int, accum_steps: int = 1):
        if global_batch % accum_steps:
            raise ConfigError(
                f"data.batch_size={global_batch} is not divisible by optim.accum_steps={accum_steps}"
            )
        per_micro = global_batch // accum_steps
        if per_micro % self.data_parallel:
            raise ConfigError(
                f"data.batch_size={global_batch} (micro-batch {per_micro}) is not divisible by "
                f"the {self.data_parallel} data-parallel devices of parallel.mode={self.mode}"
            )

    def _leaf_spec(self, keypath, leaf) -> P:
        shape = np.shape(leaf)
        if self.mode == "fsdp":
            return fsdp_spec(shape, self.mesh.shape["data"])
        if self.mode == "tensor":
            family = get_family(self.model.cfg.model_type)
            return tensor_spec(_path(keypath), shape, self.mesh.shape["model"], family)
        return P()

    def state_sharding(self, state):
        """Each state leaf's sharding; with `offload_optimizer` the optimizer
        state's in pinned host memory."""
        if self.mode == "single":
            device = jax.sharding.SingleDeviceSharding(self.devices[0])
            shardings = jax.tree.map(lambda _: device, state)
        else:
            specs = jax.tree_util.tree_map_with_path(self._leaf_spec, state)
            shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs)
        if self.offload_optimizer:
            shardings = shardings._replace(opt_state=_with_memory(shardings.opt_state, HOST))
        return shardings

    def abstract_state(self, state_shapes):
        """`state_shapes` (e.g. from `jax.eval_shape`) with this mode's
        shardings attached: what the planner lowers the step with, nothing
        allocated."""
        if self.mode == "pmap":
            n = len(self.devices)
            return jax.tree.map(
                lambda x: jax.ShapeDtypeStruct((n,) + tuple(x.shape), x.dtype), state_shapes
            )
        self._state_sharding = self.state_sharding(state_shapes)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            state_shapes,
            self._state_sharding,
        )

    def abstract_batch(self, global_batch: int, seq_len: int) -> dict:
        """The shapes of a global batch as the data pipeline makes it."""
        from ftjax.data.batching import BATCH_DTYPES

        if self.mode == "pmap":
            n = len(self.devices)
            return {
                k: jax.ShapeDtypeStruct((n, global_batch // n, seq_len), dt)
                for k, dt in BATCH_DTYPES.items()
            }
        if self.mode == "single":
            sharding = jax.sharding.SingleDeviceSharding(self.devices[0])
        else:
            sharding = self.batch_sharding()
        return {
            k: jax.ShapeDtypeStruct((global_batch, seq_len), dt, sharding=sharding)
            for k, dt in BATCH_DTYPES.items()
        }

    def tracing(self):
        """The context the step is traced in: the target platform (which
        attention kernel) and the mesh (kernels that must be `shard_map`ped)."""
        stack = contextlib.ExitStack()
        stack.enter_context(attention.target_platform(self.platform))
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
        return stack

    def _pmap_sharding(self):
        return NamedSharding(Mesh(np.array(jax.local_devices()), ("batch",)), P("batch"))

    def batch_sharding(self):
        return NamedSharding(self.mesh, P("data"))

    # ------------------------------------------------------------------ placement

    def place_state(self, state: TrainState):
        if self.mode == "single" and not self.offload_optimizer:
            return jax.device_put(state, self.devices[0])
        if self.mode == "pmap":
            # One stacked copy per local device, laid out along the pmapped axis.
            n = jax.local_device_count()
            stacked = jax.tree.map(lambda x: np.broadcast_to(x, (n,) + np.shape(x)), state)
            return jax.device_put(stacked, self._pmap_sharding())
        self._state_sharding = self.state_sharding(state)

        def put(x, sharding):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

        return jax.tree.map(put, state, self._state_sharding)

    def place_batch(self, local_batch: dict):
        """`local_batch`: this process's rows of the global batch (all rows when
        there is one process)."""
        if self.mode == "single":
            return jax.device_put(local_batch, self.devices[0])
        if self.mode == "pmap":
            n = jax.local_device_count()
            split = lambda x: np.asarray(x).reshape((n, -1) + np.shape(x)[1:])
            return jax.device_put(
                {k: split(v) for k, v in local_batch.items()}, self._pmap_sharding()
            )
        sharding = self.batch_sharding()
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()
        }

    def host_state(self, state: TrainState) -> TrainState:
        """The state as one logical copy (pmap replicas collapsed)."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x[0], state)
        return state

    # ------------------------------------------------------------------ compiled steps

    @functools.cached_property
    def _train_fn(self):
        if self.mode == "pmap":
            cfg = self.step_cfg._replace(axis_name="batch")
            fn = functools.partial(train_step, model=self.model, tx=self.tx, cfg=cfg)
            return jax.pmap(fn, axis_name="batch", donate_argnums=0)
        fn = functools.partial(train_step, model=self.model, tx=self.tx, cfg=self.step_cfg)
        if self.offload_optimizer:
            fn = _optimizer_on_device(fn, _with_memory(self._state_sharding.opt_state, DEVICE))
        if self.mode == "single":
            if not self.offload_optimizer:
                return jax.jit(fn, donate_argnums=0)
            batch = metrics = jax.sharding.SingleDeviceSharding(self.devices[0])
        else:
            batch, metrics = self.batch_sharding(), NamedSharding(self.mesh, P())
        return jax.jit(
            fn,
            in_shardings=(self._state_sharding, batch),
            out_shardings=(self._state_sharding, metrics),
            donate_argnums=0,
        )

    @functools.cached_property
    def _eval_fn(self):
        chunk = self.step_cfg.loss_chunk
        if self.mode == "pmap":
            fn = functools.partial(eval_step, model=self.model, axis_name="batch", loss_chunk=chunk)
            return jax.pmap(fn, axis_name="batch")
        return jax.jit(functools.partial(eval_step, model=self.model, loss_chunk=chunk))

    def train_step(self, state, batch):
        with self.tracing():
            state, metrics = self._train_fn(state, batch)
        if self.mode == "pmap":
            metrics = jax.tree.map(lambda x: x[0], metrics)
        return state, metrics

    def eval_sums(self, state, batch) -> dict:
        with self.tracing():
            sums = self._eval_fn(state.trainable, state.frozen, batch)
        if self.mode == "pmap":
            rows = sums.pop("predictions", None)
            sums = jax.tree.map(lambda x: x[0], sums)
            if rows is not None:  # one block of rows per device, in device order
                sums["predictions"] = np.asarray(rows).reshape((-1,) + rows.shape[2:])
        return sums

    def lower_train_step(self, state, batch):
        """The lowered (not yet compiled) step, for cost analysis and XLA dumps."""
        with self.tracing():
            return self._train_fn.lower(state, batch)


HOST, DEVICE = "pinned_host", "device"


def _with_memory(shardings, kind: str):
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


def _optimizer_on_device(step_fn, device_shardings):
    """`step_fn` for a state whose optimizer state is in host memory: moved
    to the device for the update; `out_shardings` send the new one back."""

    def step(state, batch):
        opt_state = jax.device_put(state.opt_state, device_shardings)
        return step_fn(state._replace(opt_state=opt_state), batch)

    return step


def local_rows(x) -> np.ndarray:
    """This process's rows of a batch-sharded array (all rows with one process),
    in order; a shard replicated over the model axis counts once."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def to_host(x):
    """A replicated device value as numpy on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))
