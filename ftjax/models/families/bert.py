"""BERT and RoBERTa: bidirectional post-LayerNorm encoders with learned
absolute positions, token-type embeddings and erf-GELU MLPs, with the heads of
`transformers`' `*ForSequenceClassification` (regression when num_labels == 1)
and `*ForTokenClassification`.

One module serves both families; they differ in four facts:
- the params prefix (`bert.` / `roberta.`, HF's `base_model_prefix`);
- positions: BERT numbers them 0, 1, ...; RoBERTa numbers the non-padding
  tokens from `pad_token_id + 1` and gives padding `pad_token_id` (HF's
  `create_position_ids_from_input_ids`), which is why its checkpoints have
  `max_position_embeddings = 514` for 512 tokens;
- the sequence head: BERT's pooler (dense + tanh on the first token) then a
  linear classifier; RoBERTa has no pooler in that model and its
  `classifier` is dense + tanh + `out_proj` on the first token;
- the tokenizer's special tokens, which the data code takes from the tokenizer.

The output of a call is float32: hidden states (batch, seq, hidden) for the
bare encoder (task ""), logits (batch, 1, num_labels) for sequence
classification (one prediction per sequence, so the train step's per-position
loss takes it as a sequence of length one) and (batch, seq, num_labels) for
token classification. `return_hidden=True` returns the final hidden states
whatever the task (sentence embeddings pool them).

The attention is computed in float32 with an additive mask over padding
keys, as `transformers`' eager attention does; packed rows (`segment_ids`)
and KV caches are decoder features and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.errors import ModelError
from ftjax.models import layers
from ftjax.models.config import ModelConfig
from ftjax.models.registry import FamilySpec, register_family

SEQUENCE, TOKEN = "sequence_classification", "token_classification"


def _linear(cfg: ModelConfig, features: int, name: str) -> layers.Linear:
    return layers.Linear(features, True, cfg.dtype, cfg.param_dtype, name=name)


def _layernorm(cfg: ModelConfig) -> layers.LayerNorm:
    return layers.LayerNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="LayerNorm")


def _dropout(rate: float, x, deterministic: bool):
    return nn.Dropout(rate)(x, deterministic=deterministic) if rate else x


class Embeddings(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids, positions, token_type_ids, deterministic):
        cfg = self.cfg
        embed = lambda n, name: layers.Embed(
            n, cfg.hidden_size, cfg.dtype, cfg.param_dtype, name=name
        )
        x = embed(cfg.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        return _dropout(cfg.hidden_dropout, _layernorm(cfg)(x), deterministic)


class SelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, bias, deterministic):
        cfg = self.cfg
        b, t, _ = x.shape
        n, hd = cfg.num_heads, cfg.head_size
        q, k, v = (
            _linear(cfg, n * hd, name)(x, deterministic).reshape(b, t, n, hd)
            for name in ("query", "key", "value")
        )
        scores = jnp.einsum("bqnh,bknh->bnqk", q.astype(jnp.float32), k.astype(jnp.float32))
        probs = jax.nn.softmax(scores / jnp.sqrt(jnp.float32(hd)) + bias, axis=-1)
        probs = _dropout(cfg.attention_dropout, probs, deterministic)
        out = jnp.einsum("bnqk,bknh->bqnh", probs, v.astype(jnp.float32))
        return out.reshape(b, t, n * hd).astype(cfg.dtype)


class AddNorm(nn.Module):
    """`LayerNorm(residual + dropout(dense(h)))`: a sublayer's output."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h, residual, deterministic):
        cfg = self.cfg
        h = _linear(cfg, cfg.hidden_size, "dense")(h, deterministic)
        return _layernorm(cfg)(residual + _dropout(cfg.hidden_dropout, h, deterministic))


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, bias, deterministic):
        h = SelfAttention(self.cfg, name="self")(x, bias, deterministic)
        return AddNorm(self.cfg, name="output")(h, x, deterministic)


class Intermediate(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.cfg
        h = _linear(cfg, cfg.intermediate_size, "dense")(x, deterministic)
        return layers.activation(cfg.hidden_act)(h)


class Layer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, bias, deterministic):
        x = Attention(self.cfg, name="attention")(x, bias, deterministic)
        h = Intermediate(self.cfg, name="intermediate")(x, deterministic)
        # HF's `output`; named apart from the attention's `output` (FamilySpec.renames).
        return AddNorm(self.cfg, name="ffn_output")(h, x, deterministic)


class Encoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, bias, deterministic):
        for i in range(self.cfg.num_layers):
            x = Layer(self.cfg, name=f"layer_{i}")(x, bias, deterministic)
        return x


class Pooler(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, deterministic):
        return jnp.tanh(_linear(self.cfg, self.cfg.hidden_size, "dense")(x[:, 0], deterministic))


class EncoderBody(nn.Module):
    """HF's `BertModel` / `RobertaModel`: embeddings, layers, optional pooler."""

    cfg: ModelConfig
    roberta: bool
    pooler: bool

    @nn.compact
    def __call__(self, input_ids, attention_mask, positions, token_type_ids, deterministic):
        cfg = self.cfg
        valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask > 0
        if positions is None:
            if self.roberta:
                real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
                positions = jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
            else:
                positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(cfg, name="embeddings")(input_ids, positions, token_type_ids, deterministic)
        # Padding keys get the most negative float32, as transformers' eager attention.
        bias = jnp.where(valid, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        x = Encoder(cfg, name="encoder")(x, bias, deterministic)
        pooled = Pooler(cfg, name="pooler")(x, deterministic) if self.pooler else None
        return x, pooled


class RobertaClassificationHead(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, rate, deterministic):
        cfg = self.cfg
        h = _dropout(rate, x[:, 0], deterministic)
        h = jnp.tanh(_linear(cfg, cfg.hidden_size, "dense")(h, deterministic))
        h = _dropout(rate, h, deterministic)
        return _linear(cfg, cfg.num_labels, "out_proj")(h, deterministic)


class EncoderModel(nn.Module):
    """A BERT or RoBERTa checkpoint with the head of `cfg.task` (module docstring)."""

    cfg: ModelConfig
    roberta: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        segment_ids=None,
        cache=None,
        deterministic: bool = True,
        return_hidden: bool = False,
        token_type_ids=None,
    ):
        cfg = self.cfg
        if segment_ids is not None or cache is not None:
            what = "packed rows (segment_ids)" if segment_ids is not None else "a KV cache"
            raise ModelError(f"model_type {cfg.model_type!r} is an encoder: it takes no {what}")
        # RoBERTa's sequence head replaces the pooler (transformers drops it there too).
        pooler = cfg.task == "" or (cfg.task == SEQUENCE and not self.roberta)
        body = EncoderBody(cfg, self.roberta, pooler, name="roberta" if self.roberta else "bert")
        x, pooled = body(input_ids, attention_mask, positions, token_type_ids, deterministic)
        if return_hidden or cfg.task == "":
            return x.astype(jnp.float32)
        rate = cfg.hidden_dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        if cfg.task == TOKEN:
            h = _dropout(rate, x, deterministic)
            logits = _linear(cfg, cfg.num_labels, "classifier")(h, deterministic)
        elif self.roberta:
            logits = RobertaClassificationHead(cfg, name="classifier")(x, rate, deterministic)
            logits = logits[:, None]
        else:
            h = _dropout(rate, pooled, deterministic)
            logits = _linear(cfg, cfg.num_labels, "classifier")(h, deterministic)[:, None]
        return logits.astype(jnp.float32)


class RobertaModel(EncoderModel):
    roberta: bool = True


# ----------------------------------------------------------------------------- HF config

# config.json fields that change the computation and are implemented only at
# the value given; any other value is refused by name.
_FIXED = {
    "position_embedding_type": ("absolute", None),
    "is_decoder": (False, None),
    "add_cross_attention": (False, None),
    "problem_type": (None, "single_label_classification", "regression"),
}
_HEADS = {"Model": "", "ForSequenceClassification": SEQUENCE, "ForTokenClassification": TOKEN}


def _task(hf: Mapping, prefix: str) -> str:
    """The head config.json's `architectures` names; a pre-training head
    (masked LM) is not one ftjax builds, so its body loads bare."""
    for arch in hf.get("architectures") or []:
        if arch.startswith(prefix) and arch[len(prefix) :] in _HEADS:
            return _HEADS[arch[len(prefix) :]]
    return ""


def _config_from_hf(prefix: str):
    def config_from_hf(hf: Mapping) -> dict:
        for key, allowed in _FIXED.items():
            if hf.get(key) not in allowed:
                raise ModelError(
                    f"{getattr(hf, 'source', 'config.json')}: {key}={hf.get(key)!r} is not "
                    f"implemented; expected one of {allowed}"
                )
        id2label = hf.get("id2label")
        num_labels = len(id2label) if id2label else int(hf.get("num_labels", 2))
        return dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf["num_attention_heads"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf["type_vocab_size"],
            pad_token_id=hf.get("pad_token_id") or 0,
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            classifier_dropout=hf.get("classifier_dropout"),
            task=_task(hf, prefix),
            num_labels=num_labels,
        )

    return config_from_hf


def _config_to_hf(model_type: str, prefix: str):
    def config_to_hf(cfg: ModelConfig) -> dict:
        arch = {v: k for k, v in _HEADS.items()}[cfg.task]
        labels = max(cfg.num_labels, 1)
        hf = dict(
            model_type=model_type,
            architectures=[prefix + arch],
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            type_vocab_size=cfg.type_vocab_size,
            pad_token_id=cfg.pad_token_id,
            layer_norm_eps=cfg.norm_eps,
            hidden_act=cfg.hidden_act,
            hidden_dropout_prob=cfg.hidden_dropout,
            attention_probs_dropout_prob=cfg.attention_dropout,
            classifier_dropout=cfg.classifier_dropout,
            position_embedding_type="absolute",
            id2label={str(i): f"LABEL_{i}" for i in range(labels)},
            label2id={f"LABEL_{i}": i for i in range(labels)},
        )
        if cfg.is_regression:
            hf["problem_type"] = "regression"
        return hf

    return config_to_hf


def check(cfg: ModelConfig) -> None:
    if cfg.num_kv_heads != cfg.num_heads:
        raise ModelError(
            f"model_type={cfg.model_type!r} has no grouped-query attention: "
            f"num_kv_heads={cfg.num_kv_heads} must equal num_heads={cfg.num_heads}"
        )
    if cfg.type_vocab_size < 1:
        raise ModelError(f"model_type={cfg.model_type!r} needs type_vocab_size >= 1")


_TARGETS = {
    "qv": ("query", "value"),
    "attention": ("query", "key", "value", "attention/output/dense"),
    "mlp": ("intermediate/dense", "ffn_output/dense"),
    "all-linear": (
        "query",
        "key",
        "value",
        "attention/output/dense",
        "intermediate/dense",
        "ffn_output/dense",
    ),
    # HF PEFT's IA3 default for BERT and RoBERTa: key, value and every
    # `output.dense` (both blocks' outputs), those scaled on their input.
    "ia3": ("key", "value", "attention/output/dense", "ffn_output/dense"),
    "ia3-feedforward": ("attention/output/dense", "ffn_output/dense"),
}


def _spec(name: str, module, prefix: str) -> FamilySpec:
    return FamilySpec(
        name=name,
        model_types=(name,),
        module=module,
        config_from_hf=_config_from_hf(prefix),
        config_to_hf=_config_to_hf(name, prefix),
        layers=(f"{name}/encoder", "layer"),
        targets=_TARGETS,
        column_parallel=("query", "key", "value", "intermediate/dense"),
        row_parallel=("attention/output/dense", "ffn_output/dense"),
        output_head="classifier",
        # The bare model's checkpoint (`BertModel.save_pretrained`) has no prefix.
        bare_prefix=f"{name}.",
        ignored_keys=r"embeddings\.(position_ids|token_type_ids)$",
        check=check,
        tasks=(SEQUENCE, TOKEN),
        task_head="classifier",
        scannable=False,
        peft_task_type="FEATURE_EXTRACTION",
        renames={"ffn_output": "output"},
        new_head=r"^(classifier|score)\.|\.pooler\.",
    )


BERT = register_family(_spec("bert", EncoderModel, "Bert"))
ROBERTA = register_family(_spec("roberta", RobertaModel, "Roberta"))
