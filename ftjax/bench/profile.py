"""Where a traced JAX step's time goes: op durations from a `jax.profiler`
trace, grouped by op kind and by source in the model, which the optimized HLO
text tells apart."""

from __future__ import annotations

import re

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body)=%?([\w.\-]+)")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONTAINERS = ("while", "conditional", "call")  # their bodies are traced op by op


def _op_kind(opcodes: list) -> str:
    """What an instruction (with the ops of the computations it calls) mostly does."""
    if opcodes[0] in _CONTAINERS:
        return "container"
    if any(o in ("dot", "convolution") for o in opcodes):
        return "matmul"
    if opcodes[0] == "custom-call":
        return "custom-call"
    if any(o in ("gather", "scatter", "dynamic-slice", "dynamic-update-slice") for o in opcodes):
        return "gather/scatter"
    if any(o in ("reduce", "reduce-window", "sort") for o in opcodes):
        return "reduction"
    if all(o in ("copy", "transpose", "parameter", "bitcast", "tuple") for o in opcodes):
        return "copy/transpose"
    return "elementwise"


def _op_source(op_name: str) -> str:
    """Where in the program an op comes from, from its HLO metadata: forward or
    backward, and the module path with layer numbers dropped
    (`bwd mlp/gate_proj`); ops outside the model are the loss and the update."""
    from ftjax.models.registry import layer_containers, locate_layer

    model = re.search(r"jvp\((\w+)\)\)?/(.*)", op_name)
    if not model:
        return "loss, clipping, AdamW update"
    phase = "bwd" if "transpose(jvp(" in op_name else "fwd"
    parts = model.group(2).split("/")
    where = locate_layer(parts)
    if where is not None:  # drop the family's layer container and layer (`model/layers_3`)
        parts = parts[: where[0] - 1] + parts[where[0] + 1 :]
    elif parts[0] in layer_containers():
        parts = parts[1:]
    modules = [p for p in parts[:-1] if not p.startswith("jit(")]  # last: the primitive
    return f"{phase} {'/'.join(modules[:2]) or 'logits'}"


def _hlo_ops(hlo_text: str) -> dict:
    """name -> (kind, source) of every instruction of an optimized HLO module;
    a fusion's kind is that of the heaviest op it contains."""
    comps, ops, current = {}, {}, None
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m and current is not None:
            name, opcode, rest = m.groups()
            comps[current].append(opcode)
            op_name = _OP_NAME.search(rest)
            ops[name] = (opcode, _CALLS.findall(rest), op_name.group(1) if op_name else "")
            continue
        c = _COMP.match(line)
        if c and "=" not in line.split("{")[0]:
            current = c.group(1)
            comps[current] = []
    return {
        name: (_op_kind([op] + [o for c in called for o in comps.get(c, [])]), _op_source(src))
        for name, (op, called, src) in ops.items()
    }


def op_breakdown(xplane_path: str, hlo_text: str, steps: int, wall_s: float) -> dict:
    """Seconds per step by op kind (matmul, elementwise, ...), by source in the
    model (`bwd mlp/down_proj`, ...) and the costliest ops, from a
    `jax.profiler` trace of `steps` steps."""
    from jax.profiler import ProfileData

    info = _hlo_ops(hlo_text)
    per_op: dict = {}
    for plane in ProfileData.from_file(xplane_path).planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in info and info[ev.name][0] != "container":
                    per_op[ev.name] = per_op.get(ev.name, 0.0) + ev.duration_ns * 1e-9 / steps

    def total(field):
        out: dict = {}
        for name, sec in per_op.items():
            out[info[name][field]] = out.get(info[name][field], 0.0) + sec
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:40]
    return {
        "wall_s": wall_s,
        "op_s": sum(per_op.values()),
        "by_kind": total(0),
        "by_source": total(1),
        "top_ops": [{"op": n, "kind": info[n][0], "source": info[n][1], "s": t} for n, t in top],
    }
