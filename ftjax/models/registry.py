"""The registry of model families: an HF `model_type` -> everything ftjax knows
about the architecture.

A family is one module under `ftjax/models/families/` (or anywhere else: see
docs/models.md, "Adding a model family") that describes itself once, in a
`FamilySpec`, and calls `register_family(spec)` at import. Everything that
used to branch on `model_type` or match layer names by regex reads the spec instead:
building the flax module (`build_model`), `config.json` and tensor names
(`ftjax.models.hf`), the layer stack (`layers_prefix`, `locate_layer`), the
target presets (`ftjax.peft.targets`), the HF PEFT details and the
tensor-parallel rules (`ftjax.train.parallel`).

    >>> spec = get_family("qwen2")
    >>> spec.name, spec.layers, spec.targets["qv"]
    ('llama', ('model', 'layers'), ('q_proj', 'v_proj'))

This module imports no family (and no flax module), so that `ModelConfig` can
validate its `model_type` against it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ftjax.errors import ModelError

if TYPE_CHECKING:
    import flax.linen as nn

    from ftjax.models.config import ModelConfig

# The target presets every family defines (`method.targets`); see ftjax.peft.targets.
TARGET_PRESETS = ("qv", "attention", "mlp", "all-linear")
# Presets a family may define: IA3's default modules (keys, values and the MLP's
# down projection, as HF PEFT's per-architecture defaults) and those of them
# whose input, not output, IA3 scales (its "feedforward" modules).
OPTIONAL_TARGET_PRESETS = ("ia3", "ia3-feedforward")


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What a model family is, in one place.

    Flax module and configs:
    - `model_types`: the HF `config.json` `model_type` values the family reads
      and writes (Llama, Mistral, Qwen2 and Qwen3 are one family).
    - `module(cfg) -> nn.Module`: the flax module; its call signature is
      `(input_ids, attention_mask=None, positions=None, segment_ids=None,
      cache=None, deterministic=True)` returning float32 logits (and the new
      cache when one is passed).
    - `config_from_hf(hf) -> dict`: `ModelConfig` fields from a `config.json`
      dict; `hf[key]` on a missing required key raises a one-line ModelError
      naming the file, so plain indexing is the way to say "required".
    - `config_to_hf(cfg) -> dict`: the `config.json` that `transformers`
      reads back (with `model_type` and `architectures`).
    - `check(cfg)`: raises ModelError on a config the module cannot honour.

    Parameter names. A flax path maps to its HF tensor name as a rename:
    components joined by `.`, layer `f"{layer}_{i}"` -> `f"{layer}.{i}"`, leaf
    `kernel`/`scale`/`embedding` -> `weight`, `bias` -> `bias`:
    - `transpose_kernels`: HF stores the kernel as torch `Linear` does, (out,
      in); False for (in, out) layouts such as GPT-2's `Conv1D` (which HF PEFT
      calls `fan_in_fan_out`).
    - `output_head`: the HF module name of the output projection; with tied
      embeddings a checkpoint's `<output_head>.weight` is a copy and is skipped.
    - `bare_prefix`: a prefix that checkpoints of the bare model (GPT-2's
      `transformer.`) lack; it is added when no tensor carries it.
    - `ignored_keys`: regex of checkpoint buffers that are not parameters.

    - `renames`: flax path components whose HF name differs (BERT's
      feed-forward `ffn_output` is HF's `output`, a name its attention block
      also uses: distinct flax names keep the `mlp` preset unambiguous).
    - `new_head`: regex of HF tensor names a checkpoint may lack, the task
      head that fine-tuning adds (a classifier on a bare encoder): they are
      initialized fresh, as `transformers` does, and logged.

    Layers, targets, parallelism:
    - `layers`: `(container, layer)`: layer i's params are
      `params[container][f"{layer}_{i}"]`, or, scanned, all layers stacked
      under `params[container][layer]`; the container may be a `/`-joined
      path (`bert/encoder`).
    - `peft_task_type`: HF PEFT's `task_type` for the module's own output
      (task ""): `CAUSAL_LM`, or `FEATURE_EXTRACTION` for a bare encoder.
    - `scannable`: the module can run its layers under `nn.scan`
      (`scan_layers=True`, stacked params); False refuses the option.
    - `task_head`: the top-level params key of the task heads (`classifier`):
      trained by every method and saved as PEFT's `modules_to_save`
      (`ftjax.peft.task_head`).
    - `tasks`: the `ModelConfig.task` values the module offers besides its
      own output ("" : next-token logits, or an encoder's hidden states).
    - `targets`: the module names each preset of `TARGET_PRESETS` adapts, as
      `ftjax.peft.targets` matches them (path components before `/kernel`,
      e.g. `"q_proj"` or `"attn/c_attn"`); optionally also those of
      `OPTIONAL_TARGET_PRESETS` (the defaults of the `ia3` method).
    - `column_parallel`, `row_parallel`: module names whose kernels are split
      over the `model` mesh axis along their output (column) or input (row)
      features in tensor-parallel mode (Megatron's attention-heads / MLP split).

    Output head (what the chunked cross-entropy of `ftjax.train.loss` needs;
    a family that sets neither field keeps the dense loss):
    - `head_kernel`: the params path of an untied output head's kernel (in,
      vocab), e.g. `("lm_head", "kernel")`; None when the head is always tied.
    - `tied_embedding`: the params path of the token embedding (vocab, in),
      the head (used transposed) when `tie_word_embeddings` or when there is
      no `head_kernel`.
    A family that sets them promises that its module takes `return_hidden=True`
    (without a cache) and then returns the final hidden states, after the final
    norm and before the head; `ftjax.models.head_logits` applies the head.

    Virtual tokens (prompt and prefix tuning, `ftjax.models.decoder`):
    - `kv_width(layer_params) -> int`: the width of one layer's keys
      (kv heads x head size) read off that layer's params, which is what a
      key/value prefix is sized by. A family that sets it promises that its
      module reads `decoder.read_virtual(self)` into `decoder_inputs`,
      prepends `decoder.prepend_virtual` to its input embeddings (before
      learned positions are added) and runs `apply_layers` and
      `causal_lm_outputs`: then the virtual-token params of
      `decoder.VIRTUAL_TOKENS` / `decoder.KV_PREFIX` work in every call,
      cached decoding included. None: the family takes neither.
    """

    name: str
    model_types: tuple[str, ...]
    module: Callable[[ModelConfig], nn.Module]
    config_from_hf: Callable[[Mapping[str, Any]], dict]
    config_to_hf: Callable[[ModelConfig], dict]
    layers: tuple[str, str]
    targets: Mapping[str, tuple[str, ...]]
    column_parallel: tuple[str, ...] = ()
    row_parallel: tuple[str, ...] = ()
    transpose_kernels: bool = True
    output_head: str = "lm_head"
    bare_prefix: str = ""
    ignored_keys: str = ""
    check: Callable[[ModelConfig], None] | None = None
    head_kernel: tuple[str, ...] | None = None
    tied_embedding: tuple[str, ...] | None = None
    kv_width: Callable[[Mapping[str, Any]], int] | None = None
    tasks: tuple[str, ...] = ()
    task_head: str = ""
    scannable: bool = True
    peft_task_type: str = "CAUSAL_LM"
    renames: Mapping[str, str] = dataclasses.field(default_factory=dict)
    new_head: str = ""

    def __post_init__(self):
        if not self.model_types or not all(isinstance(t, str) and t for t in self.model_types):
            raise ValueError(f"family {self.name!r}: model_types must be non-empty strings")
        if len(self.layers) != 2 or not all(self.layers):
            raise ValueError(f"family {self.name!r}: layers must be (container, layer)")
        missing = [p for p in TARGET_PRESETS if not self.targets.get(p)]
        if missing:
            raise ValueError(
                f"family {self.name!r}: targets lacks the preset(s) {', '.join(missing)}; "
                f"every family defines {', '.join(TARGET_PRESETS)}"
            )

    @property
    def returns_hidden(self) -> bool:
        """Whether the module can return its final hidden states (and so the
        loss can apply the head chunk by chunk)."""
        return self.head_kernel is not None or self.tied_embedding is not None

    @property
    def takes_virtual_tokens(self) -> bool:
        """Whether the module honours prompt-tuning tokens and key/value prefixes."""
        return self.kv_width is not None

    @property
    def fan_in_fan_out(self) -> bool:
        """HF PEFT's `fan_in_fan_out` flag: the HF weights are stored (in, out)."""
        return not self.transpose_kernels


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec, *, replace: bool = False) -> FamilySpec:
    """Makes `spec` the family of each of its `model_types` (docs/models.md,
    "Adding a model family", shows a whole one). A model_type that another
    family already has is refused unless `replace`."""
    taken = [t for t in spec.model_types if t in _FAMILIES and _FAMILIES[t] is not spec]
    if taken and not replace:
        raise ValueError(
            f"family {spec.name!r}: model_type {taken[0]!r} is already registered "
            f"(family {_FAMILIES[taken[0]].name!r}); pass replace=True to override it"
        )
    for t in spec.model_types:
        _FAMILIES[t] = spec
    return spec


def model_types() -> tuple[str, ...]:
    """Every registered `model_type`, in registration order."""
    return tuple(_FAMILIES)


def all_families() -> tuple[FamilySpec, ...]:
    """The registered families, each once."""
    return tuple({id(s): s for s in _FAMILIES.values()}.values())


def get_family(model_type: str) -> FamilySpec:
    """The family of a `model_type`; ModelError listing the supported ones otherwise."""
    spec = _FAMILIES.get(model_type)
    if spec is None:
        raise ModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(_FAMILIES)}"
        )
    return spec


def build_model(cfg: ModelConfig) -> nn.Module:
    """The flax module of `cfg`'s family; `model.init(rng, ids)["params"]`
    gives random params, `from_pretrained` a checkpoint's."""
    return get_family(cfg.model_type).module(cfg)


def layers_prefix(cfg: ModelConfig) -> tuple[str, str]:
    """(container, layer name) of the decoder stack in the params tree:
    params[container][f"{layer}_{i}"] unscanned, params[container][layer] scanned."""
    return get_family(cfg.model_type).layers


# ----------------------------------------------------------------------------- paths


def locate_layer(parts: Sequence[str]) -> tuple[int, int | None] | None:
    """Where the decoder layer is in a split params path of any registered
    family: `(position of the layer component, layer index)`, the index None
    for stacked (scanned) layers; None when the path is in no layer.

    >>> locate_layer("model/layers_3/mlp/up_proj/kernel".split("/"))
    (1, 3)
    >>> locate_layer("transformer/h/attn/c_attn/kernel".split("/"))
    (1, None)
    """
    stacks = {(tuple(c.split("/")), layer) for c, layer in (s.layers for s in _FAMILIES.values())}
    for pos in range(1, len(parts)):
        part = parts[pos]
        for c, layer in stacks:
            if tuple(parts[max(pos - len(c), 0) : pos]) != c or not part.startswith(layer):
                continue
            rest = part[len(layer) :]
            if not rest:
                return pos, None
            if rest[0] == "_" and rest[1:].isdigit():
                return pos, int(rest[1:])
    return None


def layer_containers() -> frozenset[str]:
    """The container names (`model`, `transformer`, `bert/encoder`) of every registered family."""
    return frozenset(s.layers[0] for s in _FAMILIES.values())


def container_of(params: Mapping, container: str) -> Mapping:
    """`params` at a `/`-joined container path (`bert/encoder`)."""
    for key in container.split("/"):
        params = params[key]
    return params


def with_container(params: Mapping, container: str, inner: Mapping) -> dict:
    """A copy of `params` with the subtree at `container` replaced by `inner`."""
    head, _, rest = container.partition("/")
    if not rest:
        return {**params, head: inner}
    return {**params, head: with_container(params[head], rest, inner)}


@functools.cache
def module_regex(names: tuple[str, ...]) -> re.Pattern:
    """Matches a `/`-joined path containing one of `names` as whole components
    (`"attn/c_proj"` matches `.../h_0/attn/c_proj/kernel`, not `.../mlp/c_proj/...`)."""
    alternatives = "|".join(re.escape(n) for n in names) or r"(?!)"
    return re.compile(rf"(^|/)({alternatives})(/|$)")


def families_of(kernel_paths: Sequence[str]) -> list[FamilySpec]:
    """The registered families whose layer stack and every `all-linear`
    projection appear among `kernel_paths` (`/`-joined paths of a params tree's
    kernels): how a params tree, which does not carry its config, is told apart."""
    out = []
    for spec in all_families():
        container, layer = spec.layers
        in_stack = [p for p in kernel_paths if p.startswith(f"{container}/{layer}")]
        if in_stack and all(
            any(re.search(rf"(^|/){re.escape(n)}/kernel$", p) for p in in_stack)
            for n in spec.targets["all-linear"]
        ):
            out.append(spec)
    return out
