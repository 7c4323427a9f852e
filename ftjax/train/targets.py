"""Where a step is compiled for: the local devices, N simulated CPU devices,
or a Cloud TPU slice by its accelerator-type name (`v5e-8`, `v5p-8`, ...),
with each TPU generation's datasheet figures (memory per chip, peak bf16
FLOP/s, HBM bandwidth).

A TPU slice needs no TPU: with `libtpu` installed (`pip install "jax[tpu]"`),
`jax.experimental.topologies` describes the slice's devices and the TPU
compiler compiles for them on this machine. Accelerator-type names count
TensorCores for v4 and v5p (`v5p-8` is 4 chips, each one megacore device) and
chips for v5e and v6e (`v5e-8` is 8 chips).
"""

from __future__ import annotations

import dataclasses
import os
import re

from ftjax.errors import ConfigError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
    """Per-chip datasheet figures of one TPU generation (Google Cloud's TPU
    pages): what the roofline estimate divides by."""

    prefix: str  # topology prefix jax uses, e.g. "v5e"
    memory_bytes: int  # HBM per chip
    peak_flops: float  # bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    cores_in_name: bool  # the accelerator-type number counts TensorCores (2 per chip)
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    megacore: bool  # two TensorCores act as one device


GENERATIONS = {
    "v4": Generation("v4", 32 * GIB, 275e12, 1228e9, True, 3, True),
    "v5p": Generation("v5p", 95 * GIB, 459e12, 2765e9, True, 3, True),
    "v5e": Generation("v5e", 16 * GIB, 197e12, 819e9, False, 2, False),
    "v6e": Generation("v6e", 32 * GIB, 918e12, 1640e9, False, 2, False),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}

# Chips -> topology of the slices Cloud TPU offers.
_TOPOLOGY_3D = {
    4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
    128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16",
}  # fmt: skip
_TOPOLOGY_2D = {
    1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices a plan compiles for, and what one of them can hold."""

    name: str
    devices: tuple
    platform: str  # "tpu", "gpu", "cpu"
    memory_bytes: int | None  # per device; None where unknown
    peak_flops: float | None  # per device, datasheet (an estimate's divisor)
    hbm_bandwidth: float | None
    hosts: int = 1

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def parse_tpu_name(name: str) -> tuple[Generation, int, str, int]:
    """`v5e-8` -> (generation, chips, topology, hosts). Raises ConfigError
    naming the accepted forms."""
    m = re.fullmatch(r"(v\d+[a-z]*|v\d+litepod)-(\d+)", name.strip().lower())
    gen_name = ALIASES.get(m.group(1), m.group(1)) if m else None
    if not m or gen_name not in GENERATIONS:
        raise ConfigError(
            f"--target={name!r}: expected 'local', 'cpu:N' or a Cloud TPU type "
            f"<generation>-<size> with generation one of {', '.join(GENERATIONS)} "
            "(e.g. v5e-8, v5p-8, v4-8, v6e-8)"
        )
    gen, size = GENERATIONS[gen_name], int(m.group(2))
    chips = size // 2 if gen.cores_in_name else size
    table = _TOPOLOGY_3D if gen.dims == 3 else _TOPOLOGY_2D
    if chips not in table or (gen.cores_in_name and size % 2):
        sizes = sorted(2 * c if gen.cores_in_name else c for c in table)
        raise ConfigError(
            f"--target={name!r}: no {gen_name} slice of that size; sizes: "
            f"{', '.join(map(str, sizes))}"
        )
    # Single-host slices: v5e/v6e up to 8 chips; v4/v5p hosts hold 4 chips.
    hosts = 1 if (gen.dims == 2 and chips <= 8) else max(1, chips // 4)
    return gen, chips, table[chips], hosts


def tpu_target(name: str) -> Target:
    """The devices of a Cloud TPU slice, described by libtpu (no TPU needed)."""
    gen, chips, topology, hosts = parse_tpu_name(name)
    try:
        import libtpu  # noqa: F401  (only its presence is checked)
    except ImportError:
        raise ConfigError(
            f"--target={name}: compiling for a TPU needs libtpu; install it with "
            'pip install "jax[tpu]==<your jax version>" (a separate environment keeps its '
            "start-up messages out of ordinary runs)"
        ) from None
    from jax.experimental import topologies

    kwargs = {}
    if gen.megacore and gen.prefix == "v4":
        kwargs["chip_config_name"] = "megacore"
    if hosts == 1:
        x, y, *z = (int(d) for d in topology.split("x"))
        kwargs["chips_per_host_bounds"] = (x, y, z[0] if z else 1)
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{gen.prefix}:{topology}", **kwargs
    )
    devices = tuple(desc.devices)
    if len(devices) != chips:
        raise ConfigError(
            f"--target={name}: libtpu described {len(devices)} devices for {chips} chips "
            f"({gen.prefix}:{topology}); this libtpu version lays the slice out differently"
        )
    return Target(
        name, devices, "tpu", gen.memory_bytes, gen.peak_flops, gen.hbm_bandwidth, hosts=hosts
    )


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def local_target(name: str = "local") -> Target:
    """The devices this process sees (`cpu:N` asks for N of them: the caller
    sets `jax_num_cpu_devices` before JAX starts, see `request_cpu_devices`)."""
    import jax

    devices = tuple(jax.devices())
    m = re.fullmatch(r"cpu:(\d+)", name)
    if m:
        want = int(m.group(1))
        cpus = tuple(jax.devices("cpu"))
        if len(cpus) < want:
            raise ConfigError(
                f"--target={name}: this process has {len(cpus)} CPU devices; the CPU device "
                "count is fixed when JAX starts (scripts/plan.py sets it from --target)"
            )
        devices = cpus[:want]
    platform = devices[0].platform
    memory = None
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "bytes_limit" in stats:
        memory = int(stats["bytes_limit"])
    elif platform == "cpu":
        # Simulated CPU devices share the host's memory.
        total = host_memory_bytes()
        memory = None if total is None else total // len(devices)
    return Target(name, devices, platform, memory, None, None)


def request_cpu_devices(target_name: str) -> None:
    """Before JAX starts: make `cpu:N` targets have N CPU devices."""
    m = re.fullmatch(r"cpu:(\d+)", target_name or "")
    if m:
        import jax

        jax.config.update("jax_num_cpu_devices", int(m.group(1)))
        jax.config.update("jax_platforms", "cpu")


def resolve_target(name: str) -> Target:
    if name == "local" or re.fullmatch(r"cpu:\d+", name):
        return local_target(name)
    return tpu_target(name)
