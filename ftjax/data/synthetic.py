"""The built-in task suite of the default experiment, and its tokenizer.

A "general" distribution of small string tasks that a ~1M-parameter model
learns on a CPU in minutes stands in for pre-training data; a "target" task
built on an operation the general data never shows stands in for the
fine-tuning task. Fine-tuning on the target then has something to learn, and
the general eval set measures what it forgets.

    paths = write_suite("/tmp/suite", seed=0)         # jsonl files + manifest.json
    tok_dir = build_char_tokenizer("/tmp/suite/tokenizer")
    cfg = suite_data_config(paths, tok_dir, general_weight=0.2)

Every row is a prompt/completion pair (`prompt`, `completion`), the exact-match
`answer`, the `task`, an `id`, `text` (prompt + completion, for the `text`
format), and `noisy` (whether the completion was corrupted). With
`label_noise=r`, a fraction r of the target train rows get a plausible wrong
completion; `manifest.json` lists each (id, prompt, answer, wrong) for
memorization studies.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string

from ftjax.data.errors import DataError

# Characters the tokenizer knows; anything else maps to <unk>.
ALPHABET = (
    string.ascii_lowercase
    + string.ascii_uppercase
    + string.digits
    + " \n.,:;!?=+-*/%#<>|()[]{}'\"_&@^~$"
)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MAX_CHARS = 64
GENERAL_TASKS = ("copy", "reverse", "sort", "add", "lookup")
TARGET_TASKS = ("rot", "modop", "rsort", "upper", "flip")
ROT_SHIFT = 3
# Operands of `add` and `modop`: two-digit sums stay learnable for a tiny model.
MAX_OPERAND = 50
LETTERS = string.ascii_lowercase


def build_char_tokenizer(out_dir: str, chat_template: str | None = CHAT_TEMPLATE) -> str:
    """Writes a character-level tokenizer in Hugging Face format and returns
    `out_dir`; load it with `AutoTokenizer.from_pretrained(out_dir)`.

    Ids: 0 <pad>, 1 <s> (BOS), 2 </s> (EOS), 3 <unk>, then one per character of
    `ALPHABET`, then the chat role markers. `chat_template=None` leaves the
    chat template out (for testing that case).

        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained(build_char_tokenizer("tok"))
        >>> tok("ab")["input_ids"]
        [4, 5]
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    for tok in ROLE_TOKENS:
        vocab[tok] = len(vocab)
    # BPE without merges and without a pre-tokenizer: one token per character.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS + ROLE_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=list(ROLE_TOKENS),
    )
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- tasks
# Each task: make(rng) -> (prompt, answer), and wrong(rng, prompt, answer) -> a
# plausible wrong answer of the same shape.


def _word(rng: random.Random, lo: int = 3, hi: int = 10) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _one_char_off(rng: random.Random, answer: str) -> str:
    i = rng.randrange(len(answer))
    return answer[:i] + rng.choice([c for c in LETTERS if c != answer[i]]) + answer[i + 1 :]


def _number_off(rng: random.Random, answer: str, modulus: int | None = None) -> str:
    value = int(answer)
    while True:
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 3])
        if modulus:
            wrong %= modulus
        if wrong >= 0 and wrong != value:
            return str(wrong)


def _rot(s: str, k: int = ROT_SHIFT) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in s)


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(LETTERS, rng.randint(2, 6))
    values = [str(rng.randrange(10)) for _ in keys]
    query = rng.randrange(len(keys))
    pairs = ",".join(k + v for k, v in zip(keys, values, strict=True))
    return f"lookup:{pairs}?{keys[query]}=", values[query]


def _lookup_wrong(rng: random.Random, prompt: str, answer: str) -> str:
    pairs = prompt[len("lookup:") : prompt.index("?")].split(",")
    others = sorted({p[1] for p in pairs} - {answer})
    return rng.choice(others or [d for d in string.digits if d != answer])


def _copy(rng):
    w = _word(rng)
    return f"copy:{w}=", w


def _reverse(rng):
    w = _word(rng)
    return f"reverse:{w}=", w[::-1]


def _sort(rng):
    w = _word(rng)
    return f"sort:{w}=", "".join(sorted(w))


def _add(rng):
    a, b = rng.randrange(MAX_OPERAND), rng.randrange(MAX_OPERAND)
    return f"add:{a}+{b}=", str(a + b)


def _rot_task(rng):
    # Caesar shift: the alignment of `copy` through a letter map never seen before.
    w = _word(rng)
    return f"rot:{w}=", _rot(w)


def _rsort(rng):
    # Descending sort: `sort`'s letters in the other order, a recombination of
    # skills the base has (sort, reverse) under a prompt it has never seen.
    w = _word(rng)
    return f"rsort:{w}=", "".join(sorted(w, reverse=True))


def _flip(rng):
    # `reverse` under a keyword the base has never seen.
    w = _word(rng)
    return f"flip:{w}=", w[::-1]


def _upper(rng):
    # `copy` into capital letters: the base's copying alignment is reused, but
    # its outputs are symbols pre-training never produced.
    w = _word(rng)
    return f"upper:{w}=", w.upper()


def _modop(rng):
    # A new operator on the numbers `add` uses: a # b = (a + 2b) mod 10.
    a, b = rng.randrange(MAX_OPERAND), rng.randrange(MAX_OPERAND)
    return f"op:{a}#{b}=", str((a + 2 * b) % 10)


TASKS = {
    "copy": (_copy, lambda rng, prompt, answer: _one_char_off(rng, answer)),
    "reverse": (_reverse, lambda rng, prompt, answer: _one_char_off(rng, answer)),
    "sort": (_sort, lambda rng, prompt, answer: "".join(sorted(_one_char_off(rng, answer)))),
    "add": (_add, lambda rng, prompt, answer: _number_off(rng, answer)),
    "lookup": (_lookup, _lookup_wrong),
    # Wrong shift: the mistake a half-learned rot would make.
    "rot": (
        _rot_task,
        lambda rng, prompt, answer: _rot(prompt[4:-1], ROT_SHIFT + rng.choice([-1, 1])),
    ),
    "modop": (_modop, lambda rng, prompt, answer: _number_off(rng, answer, modulus=10)),
    "flip": (_flip, lambda rng, prompt, answer: _one_char_off(rng, answer)),
    "upper": (_upper, lambda rng, prompt, answer: _one_char_off(rng, answer.lower()).upper()),
    "rsort": (
        _rsort,
        lambda rng, prompt, answer: "".join(sorted(_one_char_off(rng, answer), reverse=True)),
    ),
}


def _task(name: str):
    if name not in TASKS:
        raise DataError(f"unknown synthetic task {name!r}; tasks: {sorted(TASKS)}")
    return TASKS[name]


def _rng(seed: int, *keys: str) -> random.Random:
    # Seeded from a digest, not hash(), so the suite is identical across processes.
    digest = hashlib.sha256("/".join([str(seed), *keys]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def make_examples(
    tasks, n: int, seed: int, split: str, exclude: set[str] = frozenset()
) -> list[dict]:
    """`n` rows drawn uniformly over `tasks`, with prompts not in `exclude`
    (so eval prompts never appear in training)."""
    makers = {t: _task(t) for t in tasks}
    rng = _rng(seed, split, *tasks)
    rows, rejected = [], 0
    while len(rows) < n:
        task = rng.choice(list(tasks))
        prompt, answer = makers[task][0](rng)
        if prompt in exclude or len(prompt) + len(answer) > MAX_CHARS:
            rejected += 1
            if rejected > 100 * n + 1000:  # the eval set has taken (nearly) every prompt
                raise DataError(f"{split}: cannot draw {n} prompts outside the eval set")
            continue
        rows.append({"id": f"{split}-{len(rows):06d}", "task": task, "prompt": prompt,
                     "completion": answer, "answer": answer, "noisy": False})  # fmt: skip
    return rows


def add_label_noise(rows: list[dict], rate: float, seed: int, split: str) -> list[dict]:
    """Replaces the completion of a seeded `rate` fraction of rows with a wrong
    answer of the same task; returns the corrupted rows' records."""
    rng = _rng(seed, split, "noise")
    records = []
    for row in rows:
        if rng.random() >= rate:
            continue
        wrong = _task(row["task"])[1](rng, row["prompt"], row["answer"])
        row.update(completion=wrong, noisy=True)
        records.append({"id": row["id"], "task": row["task"], "prompt": row["prompt"],
                        "answer": row["answer"], "wrong": wrong})  # fmt: skip
    return records


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**row, "text": row["prompt"] + row["completion"]}) + "\n")


def write_suite(
    out_dir: str,
    seed: int = 0,
    *,
    general_train: int = 20000,
    general_eval: int = 500,
    target_train: int = 2000,
    target_eval: int = 200,
    target_val: int = 0,
    target_task: str = "rot",
    label_noise: float = 0.0,
    general_tasks: str = ",".join(GENERAL_TASKS),
) -> dict[str, str]:
    """Writes the suite as prompt/completion JSON-lines files and returns their
    paths: general_train, general_eval, target_train, target_eval, manifest,
    and with `target_val` > 0 target_val: a validation split of the target
    task, disjoint from both target_eval and target_train, for choosing
    hyperparameters without looking at the test prompts.

    Label noise (a fraction `label_noise` of rows) applies to target_train only:
    that is the data fine-tuning sees. `general_tasks` (comma-separated names
    from GENERAL_TASKS) chooses what pre-training and the forgetting measure cover.

        >>> paths = write_suite("suite", seed=0, general_train=100, target_train=50)
        >>> sorted(paths)
        ['general_eval', 'general_train', 'manifest', 'target_eval', 'target_train']
        >>> paths["target_train"]
        'suite/target_train.jsonl'
    """
    if target_task not in TARGET_TASKS:
        raise DataError(f"target_task={target_task!r}; expected one of {TARGET_TASKS}")
    if not 0 <= label_noise < 1:
        raise DataError(f"label_noise={label_noise}; expected a rate in [0, 1)")
    general = tuple(t.strip() for t in general_tasks.split(","))
    if not general or not set(general) <= set(GENERAL_TASKS) or len(set(general)) != len(general):
        raise DataError(
            f"general_tasks={general_tasks!r}; expected distinct names from {GENERAL_TASKS}"
        )
    os.makedirs(out_dir, exist_ok=True)
    general_ev = make_examples(general, general_eval, seed, "general-eval")
    general_tr = make_examples(
        general, general_train, seed, "general-train", {r["prompt"] for r in general_ev}
    )
    target_ev = make_examples((target_task,), target_eval, seed, "target-eval")
    held_out = {r["prompt"] for r in target_ev}
    target_va = []
    if target_val:
        target_va = make_examples((target_task,), target_val, seed, "target-val", held_out)
        held_out |= {r["prompt"] for r in target_va}
    target_tr = make_examples((target_task,), target_train, seed, "target-train", held_out)
    corrupted = add_label_noise(target_tr, label_noise, seed, "target-train") if label_noise else []
    paths = {}
    for name, rows in [("general_train", general_tr), ("general_eval", general_ev),
                       ("target_train", target_tr), ("target_eval", target_ev),
                       ("target_val", target_va)]:  # fmt: skip
        if name == "target_val" and not target_val:
            continue
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        _write_jsonl(paths[name], rows)
    paths["manifest"] = os.path.join(out_dir, "manifest.json")
    manifest = {
        "seed": seed,
        "general_tasks": list(general),
        "target_task": target_task,
        "sizes": {
            "general_train": general_train,
            "general_eval": general_eval,
            "target_train": target_train,
            "target_eval": target_eval,
            "target_val": target_val,
        },  # fmt: skip
        "label_noise": label_noise,
        "corrupted": corrupted,
        "files": {k: os.path.basename(v) for k, v in paths.items() if k != "manifest"},
    }
    with open(paths["manifest"], "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return paths


def suite_data_config(paths: dict[str, str], tokenizer_dir: str, *, general_weight: float = 0.0,
                      target_weight: float = 1.0, **overrides):  # fmt: skip
    """A data config over the suite: `target` and `general` sources with their
    eval files. `general_weight=0` keeps general data for eval only (to measure
    forgetting); a positive weight mixes it into training against forgetting.

        >>> paths = write_suite("suite", seed=0, general_train=100, target_train=50)
        >>> cfg = suite_data_config(paths, "tok", general_weight=0.2, seq_len=64)
        >>> cfg.sources.general.weight, cfg.sources.general.eval_path, cfg.seq_len
        (0.2, 'suite/general_eval.jsonl', 64)
    """
    from ftjax.data.config import default_data_config, source_config

    cfg = default_data_config()
    cfg.tokenizer = tokenizer_dir
    cfg.seq_len = 64 + 2  # prompt + completion (<= 64 chars) plus BOS and EOS
    for name, weight in (("target", target_weight), ("general", general_weight)):
        cfg.sources[name] = source_config(
            paths[f"{name}_train"], eval_path=paths[f"{name}_eval"], weight=weight
        )
    if "target_val" in paths:  # eval only: the split hyperparameters are chosen on
        cfg.sources["target_val"] = source_config(
            paths["target_val"], eval_path=paths["target_val"], weight=0.0
        )
    for key, value in overrides.items():
        cfg[key] = value
    return cfg
