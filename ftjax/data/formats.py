"""Example formats: how a row becomes token ids and a per-token label mask.

`labels[i] == 1` means token i is trained on as a prediction target (the
batcher turns it into `loss_mask` at the position that predicts token i).

- `text`: continued pre-training; every token is trained.
- `prompt_completion`: SFT; only the completion (and the EOS after it).
- `chat`: a `messages` list rendered with the tokenizer's chat template; only
  the assistant turns (their content and the template's end-of-turn marker).

    # spec: a SourceSpec with format "prompt_completion"; a char-level tokenizer
    ids, labels, n_content = encode_rows(tok, spec, {"prompt": ["1+1="], "completion": ["2"]},
                                         indices=[0], locate=str, bos_id=1, eos_id=2)
    # ids    [[1, <1>, <+>, <1>, <=>, <2>, 2]]
    # labels [[0,  0,   0,   0,   0,   1,  1]]    n_content [1]

Assistant spans are found by rendering the conversation prefix by prefix: the
text between `render(messages[:i], add_generation_prompt=True)` and
`render(messages[:i+1])` is assistant turn i. Each piece is tokenized on its
own, so the mask boundaries are exact and the prompt tokens are the ones a
generation-time prompt would have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ftjax.data.config import SourceSpec
from ftjax.data.errors import DataError


def format_fields(spec: SourceSpec) -> list[str]:
    """The column names a source's format reads."""
    keys = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "chat": ["messages"]}
    return [spec.field(k) for k in keys[spec.format]]


def check_format(spec: SourceSpec, columns: Sequence[str], tokenizer, origin: str) -> None:
    """Fails early, before tokenizing, on a missing column or a chat format
    without a chat template."""
    expected = format_fields(spec)
    missing = [c for c in expected if c not in columns]
    if missing:
        raise DataError(
            f"{origin}: no field {missing[0]!r}; format {spec.format!r} expects fields "
            f"{expected} (columns found: {list(columns)}; rename with fields.<key>=...)"
        )
    if spec.format == "chat" and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"{origin}: format 'chat' renders messages with the tokenizer's chat template, but "
            f"tokenizer {name!r} has none; expected a tokenizer with a chat_template, "
            "or use format 'prompt_completion'"
        )


def _string(value, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field!r} is missing or not a string (got {value!r}); expected a string"
        )
    return value


# The roles chat templates know; a misspelt one would render as nothing the
# model is trained on, and the row would be dropped as empty.
CHAT_ROLES = ("system", "user", "assistant", "tool")


def _messages(value, field: str, where: str) -> list[dict]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(
            f"{where}: field {field!r} is {value!r}; expected a non-empty list of "
            "{'role': ..., 'content': ...} messages"
        )
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: message {j} is {m!r}; expected a dict with a 'role' string")
        if m["role"] not in CHAT_ROLES:
            raise DataError(
                f"{where}: message {j} has unknown role {m['role']!r}; expected one of "
                f"{', '.join(CHAT_ROLES)}"
            )
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j} has no 'content' string; expected one")
        # datasets fills keys other rows have with None; templates should not see them.
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def chat_pieces(tokenizer, messages: list[dict], where: str = "") -> list[tuple[str, bool]]:
    """Splits the rendered conversation into (text, is_assistant) pieces.

    >>> from ftjax.data.synthetic import build_char_tokenizer
    >>> from ftjax.data.tokenize import load_tokenizer
    >>> tok = load_tokenizer(build_char_tokenizer("tok"))
    >>> chat_pieces(tok, [{"role": "user", "content": "hi"},
    ...                   {"role": "assistant", "content": "yo"}])
    [('<s><|user|>hi<|end|><|assistant|>', False), ('yo<|end|>', True)]
    """

    def render(msgs, generation_prompt):
        try:
            return tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise DataError(
                f"{where}: the chat template failed to render ({type(e).__name__}: {first})"
            ) from e

    full = render(messages, False)
    pieces, cut = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        end_text = render(messages[: i + 1], False)
        start = len(prefix)
        if not (end_text.startswith(prefix) and full.startswith(end_text) and start >= cut):
            raise DataError(
                f"{where}: the chat template does not render the conversation prefix by prefix "
                f"at message {i}; cannot locate the assistant tokens"
            )
        pieces.append((full[cut:start], False))
        pieces.append((full[start : len(end_text)], True))
        cut = len(end_text)
    pieces.append((full[cut:], False))
    return [(text, trained) for text, trained in pieces if text]


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_rows(
    tokenizer,
    spec: SourceSpec,
    batch: dict[str, list],
    indices: Sequence[int],
    locate: Callable[[int], str],
    bos_id: int | None,
    eos_id: int | None,
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(input_ids, labels, n_content) for a batch of rows of one source.

    `bos_id`/`eos_id` (None to skip) are added around text and prompt/completion
    examples; chat templates place their own. `n_content` counts the trained
    content tokens without an added EOS, so that empty examples can be dropped.
    """
    bos = [] if bos_id is None else [int(bos_id)]
    eos = [] if eos_id is None else [int(eos_id)]
    ids_out, labels_out, content_out = [], [], []
    if spec.format == "text":
        field = spec.field("text")
        texts = [_string(v, field, locate(i)) for v, i in zip(batch[field], indices, strict=True)]
        for toks in _tokenize(tokenizer, texts):
            ids_out.append(bos + toks + eos)
            labels_out.append([0] * len(bos) + [1] * (len(toks) + len(eos)))
            content_out.append(len(toks))
    elif spec.format == "prompt_completion":
        pf, cf = spec.field("prompt"), spec.field("completion")
        prompts = [_string(v, pf, locate(i)) for v, i in zip(batch[pf], indices, strict=True)]
        comps = [_string(v, cf, locate(i)) for v, i in zip(batch[cf], indices, strict=True)]
        for p, c in zip(_tokenize(tokenizer, prompts), _tokenize(tokenizer, comps), strict=True):
            ids_out.append(bos + p + c + eos)
            labels_out.append([0] * (len(bos) + len(p)) + [1] * (len(c) + len(eos)))
            content_out.append(len(c))
    else:
        field = spec.field("messages")
        for v, i in zip(batch[field], indices, strict=True):
            pieces = chat_pieces(tokenizer, _messages(v, field, locate(i)), locate(i))
            ids, labels = [], []
            for toks, (_, trained) in zip(
                _tokenize(tokenizer, [t for t, _ in pieces]), pieces, strict=True
            ):
                ids += toks
                labels += [int(trained)] * len(toks)
            ids_out.append(ids)
            labels_out.append(labels)
            content_out.append(sum(labels))
    return ids_out, labels_out, content_out
