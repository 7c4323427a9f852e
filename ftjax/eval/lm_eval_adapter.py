"""lm-evaluation-harness model class: run any harness task on an ftjax model,
with plain, merged or adapter params.

Importing this module needs the `lm_eval` package (`pip install "lm_eval>=0.4"`);
nothing else in ftjax imports it. The class is registered as `ftjax`.

From Python, with params already in memory (e.g. LoRA leaves after training):

    from lm_eval import simple_evaluate
    from ftjax.eval.lm_eval_adapter import FtjaxLM
    lm = FtjaxLM(model=model, params=params, tokenizer=hf_tokenizer, batch_size=16)
    results = simple_evaluate(model=lm, tasks=["hellaswag"])

From the command line, a Hugging Face checkpoint directory (or hub id). The
harness only knows models whose module is imported, so go through this
module, which registers the class and then hands its arguments to the
harness's own command line unchanged:

    python -m ftjax.eval.lm_eval_adapter --model ftjax \\
        --model_args path=out/merged,dtype=bfloat16 --tasks arc_easy --batch_size 16

or a base checkpoint with a Hugging Face PEFT adapter on top:
`--model_args path=meta-llama/Llama-3.2-1B,adapter=runs/lora/adapter`.
"""

from __future__ import annotations

import logging

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ftjax.eval.lm_eval_adapter needs lm-evaluation-harness: pip install 'lm_eval>=0.4' "
        "(or the `eval` extra of ftjax)"
    ) from e

import jax

from ftjax.errors import ConfigError
from ftjax.eval.generate import generate, truncate_at
from ftjax.eval.scoring import loglikelihoods

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8


def _as_int(value, default: int) -> int:
    """The harness passes command-line numbers as strings and may pass "auto"."""
    if value is None:
        return default
    if isinstance(value, str) and not value.strip().isdigit():
        log.warning("batch_size=%r is not supported; using %d", value, default)
        return default
    return int(value)


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


class FtjaxLM(TemplateLM):
    """An ftjax causal LM for the harness.

    Either `path` (a Hugging Face checkpoint directory or hub id, loaded with
    `ftjax.models.from_pretrained`) or `model` and `params` (any params
    pytree: adapter leaves are applied as they are); `adapter` adds a Hugging
    Face PEFT adapter directory on top (LoRA/DoRA leaves, not merged). `tokenizer` is a
    tokenizer object or a name/path for `AutoTokenizer` (default: `path`).
    `max_length` bounds context plus continuation (default: the model's
    max_position_embeddings); `add_bos_token` forces BOS on (or off) for every
    encoded string, otherwise the tokenizer's default decides, as in the
    harness's `hf` model.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        model=None,
        params=None,
        tokenizer=None,
        adapter: str | None = None,
        dtype: str = "float32",
        scan_layers: bool = False,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token: bool | str | None = None,
        seed: int | str = 0,
        **unused,
    ):
        super().__init__()
        unused.pop("device", None)  # the harness always passes these; JAX places arrays itself
        unused.pop("max_batch_size", None)
        if unused:
            raise ConfigError(f"FtjaxLM got unexpected arguments: {sorted(unused)}")
        if model is None or params is None:
            if path is None:
                raise ConfigError("FtjaxLM needs `path` or both `model` and `params`")
            from ftjax.models import from_pretrained

            model, params = from_pretrained(path, dtype=dtype, scan_layers=_as_bool(scan_layers))
        if adapter:
            from ftjax.peft import load_adapter

            params = load_adapter(model.cfg, params, adapter)
        if tokenizer is None or isinstance(tokenizer, str):
            if tokenizer is None and path is None:
                raise ConfigError(
                    "FtjaxLM needs a `tokenizer` when built from `model` and `params`"
                )
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or path)
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; the harness needs one")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size = _as_int(batch_size, DEFAULT_BATCH_SIZE)
        self._max_length = _as_int(max_length, model.cfg.max_position_embeddings)
        self.max_gen_toks = _as_int(max_gen_toks, 256)
        self.add_bos_token = None if add_bos_token is None else _as_bool(add_bos_token)
        self._rng = jax.random.key(_as_int(seed, 0))
        self._name = path or getattr(tokenizer, "name_or_path", "ftjax")

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self._name)).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        # As the harness's own HF model: an explicit flag wins, then
        # `add_bos_token`, then the tokenizer's default (BOS for Llama-family
        # tokenizers), except for text that already starts with BOS.
        flag = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = self.tokenizer.bos_token
        if flag is None and bos and string.startswith(bos):
            flag = False
        options = {} if flag is None else {"add_special_tokens": bool(flag)}
        return self.tokenizer.encode(string, **options)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------ scoring

    def _score(self, pairs):
        return loglikelihoods(
            self.model, self.params, pairs, batch_size=self.batch_size, max_length=self.max_length
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        if not requests:
            return []
        result = self._score([(ctx, cont) for _, ctx, cont in requests])
        out = []
        for (key, _, _), ll, greedy in zip(requests, result.logprob, result.is_greedy, strict=True):
            answer = (float(ll), bool(greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, in disjoint windows of `max_length`
        tokens, each conditioned on as much preceding text as fits."""
        pairs, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(k)
        totals = [0.0] * len(requests)
        if pairs:
            for k, ll in zip(owner, self._score(pairs).logprob, strict=True):
                totals[k] += float(ll)
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ------------------------------------------------------------------ generation

    def _generation_options(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos_text = self.tok_decode([self.eot_token_id])
        if eos_text and eos_text not in until:
            until.append(eos_text)
        max_new = kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks))
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        if not _as_bool(kw.pop("do_sample", temperature > 0)):
            temperature = 0.0
        options = dict(
            max_new_tokens=int(max_new),
            temperature=temperature,
            top_k=int(kw.pop("top_k", 0) or 0),
            top_p=float(kw.pop("top_p", 1.0) or 1.0),
        )
        if kw:
            log.warning("ignoring generation arguments %s", sorted(kw))
        return options, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuations, cut at the
        task's stop strings. Requests with the same options run in batches;
        contexts too long for the model lose their oldest tokens."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        parsed = [self._generation_options(req.args[1]) for req in requests]
        for k, (options, until) in enumerate(parsed):
            groups.setdefault(repr((sorted(options.items()), until)), []).append(k)
        pad = self.tokenizer.pad_token_id
        pad = self.eot_token_id if pad is None else pad
        for indices in groups.values():
            options, until = parsed[indices[0]]
            budget = self.max_length - options["max_new_tokens"]
            if budget < 1:
                raise ConfigError(
                    f"max_gen_toks={options['max_new_tokens']} leaves no room for a prompt in "
                    f"the model's context of {self.max_length} tokens"
                )
            for lo in range(0, len(indices), self.batch_size):
                chunk = indices[lo : lo + self.batch_size]
                prompts = []
                for k in chunk:
                    ids = self.tok_encode(requests[k].args[0]) or [self.prefix_token_id]
                    prompts.append(ids[-budget:])
                # A fixed batch size keeps one compiled program per prompt width.
                prompts += [prompts[0]] * (self.batch_size - len(prompts))
                self._rng, key = jax.random.split(self._rng)
                out = generate(
                    self.model,
                    self.params,
                    prompts,
                    stop_tokens=[self.eot_token_id],
                    rng=key,
                    pad_id=pad,
                    max_length=self.max_length,
                    **options,
                )
                for k, tokens in zip(chunk, out.sequences(), strict=False):
                    text = truncate_at(self.tok_decode(tokens), until)
                    self.cache_hook.add_partial("generate_until", requests[k].args, text)
                    results[k] = text
        return results


def register() -> None:
    """Registers FtjaxLM as the harness model `ftjax` (idempotent)."""
    from lm_eval.api.registry import MODEL_REGISTRY

    if MODEL_REGISTRY.get("ftjax", None) is FtjaxLM:
        return
    register_model("ftjax")(FtjaxLM)


def main() -> None:
    """The harness's command line with the `ftjax` model registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


# Registered on import, but not when run as a script: `python -m` executes this
# file as `__main__`, and main() below imports the real module, which registers.
if __name__ != "__main__":
    register()

if __name__ == "__main__":
    from ftjax.eval.lm_eval_adapter import main as _main

    _main()
