"""Generated English sentences for offline encoder studies: a sentence
classification task and a paraphrase-retrieval probe of sentence embeddings.

Both are drawn from small hand-written vocabularies by seeded templates, so
that they exist on any machine without a download:

- `negation_rows`: "A young chef is cooking the soup in the kitchen." (label
  0) against the same kind of sentence negated in one of several ways ("is
  not", "never", "no longer", "doesn't") (label 1). Meaning-wise a negated
  sentence stays close to its affirmative twin, which a sentence-embedding
  model places near it; a classifier must pull them apart, which is what
  makes the task a probe of forgetting.
- `paraphrase_pairs`: pairs of sentences that say the same thing in other
  words (synonyms, active/progressive verb forms, reordered place phrase),
  from a vocabulary disjoint from the task's, each against many hard
  negatives that share words with it. A model that embeds meaning retrieves
  each sentence's paraphrase first (`ftjax.eval.embeddings`).

    >>> rows = negation_rows(4, seed=0)
    >>> sorted(rows[0])
    ['label', 'text']
"""

from __future__ import annotations

import json
import os
import random

# The classification task's vocabulary: (subject, (progressive, simple, negated
# simple), object, place).
_SUBJECTS = ["a young chef", "the old farmer", "my neighbour", "a tall student", "the nurse",
             "a quiet painter", "the bus driver", "our teacher", "a tired doctor", "the pilot"]  # fmt: skip
_ACTIONS = [
    ("cooking", "cooks", "cook", ["the soup", "dinner", "the rice"]),
    ("reading", "reads", "read", ["the newspaper", "a novel", "the letter"]),
    ("cleaning", "cleans", "clean", ["the windows", "the car", "the floor"]),
    ("painting", "paints", "paint", ["the fence", "a portrait", "the door"]),
    ("fixing", "fixes", "fix", ["the bicycle", "the roof", "the radio"]),
    ("watching", "watches", "watch", ["the game", "the birds", "a film"]),
]
_PLACES = ["in the kitchen", "at the park", "in the garden", "at home", "near the station",
           "in the library", "on the balcony", "at school"]  # fmt: skip


def _affirmative(rng: random.Random, subject, ing, s_form, obj, place) -> str:
    forms = [f"{subject} is {ing} {obj} {place}", f"{subject} {s_form} {obj} {place}",
             f"{place} {subject} is {ing} {obj}"]  # fmt: skip
    return rng.choice(forms)


def _negated(rng: random.Random, subject, ing, s_form, base, obj, place) -> str:
    forms = [f"{subject} is not {ing} {obj} {place}", f"{subject} never {s_form} {obj} {place}",
             f"{subject} is no longer {ing} {obj} {place}", f"{subject} doesn't {base} {obj} {place}",
             f"{place} {subject} is not {ing} {obj}"]  # fmt: skip
    return rng.choice(forms)


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def negation_rows(n: int, seed: int) -> list[dict]:
    """`n` rows {"text", "label"}: label 1 for a negated sentence, balanced."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = rng.choice(_SUBJECTS)
        ing, s_form, base, objects = rng.choice(_ACTIONS)
        obj, place = rng.choice(objects), rng.choice(_PLACES)
        negated = i % 2 == 1
        text = (_negated(rng, subject, ing, s_form, base, obj, place) if negated
                else _affirmative(rng, subject, ing, s_form, obj, place))  # fmt: skip
        rows.append({"text": _sentence(text), "label": int(negated)})
    rng.shuffle(rows)
    return rows


# The probe's vocabulary (disjoint from the task's): meanings, each with
# several wordings.
_P_SUBJECTS = [["a man", "a guy", "a gentleman"], ["a woman", "a lady"], ["a child", "a kid"],
               ["a dog", "a puppy"], ["a musician", "a performer"], ["two friends", "a pair of friends"],
               ["a policeman", "a police officer"], ["a girl", "a young girl"]]  # fmt: skip
_P_ACTIONS = [
    (["is playing the guitar", "plays the guitar", "is strumming a guitar"]),
    (["is riding a horse", "rides a horse", "is on horseback"]),
    (["is eating an apple", "eats an apple", "is biting into an apple"]),
    (["is swimming in the lake", "swims in the lake", "is taking a swim in the lake"]),
    (["is slicing a tomato", "slices a tomato", "is cutting a tomato"]),
    (["is running on the beach", "runs along the beach", "is jogging on the beach"]),
    (["is talking on the phone", "talks on the phone", "is making a phone call"]),
    (["is climbing a mountain", "climbs a mountain", "is scaling a mountain"]),
]


def paraphrase_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` distinct (sentence, paraphrase) pairs: the same subject meaning and
    action meaning in two different wordings."""
    rng = random.Random(seed)
    meanings = [(s, a) for s in range(len(_P_SUBJECTS)) for a in range(len(_P_ACTIONS))]
    rng.shuffle(meanings)
    if n > len(meanings):
        raise ValueError(f"paraphrase_pairs: at most {len(meanings)} distinct meanings, asked {n}")
    pairs = []
    for s, a in meanings[:n]:
        s1, s2 = rng.sample(_P_SUBJECTS[s], 2)
        a1, a2 = rng.sample(_P_ACTIONS[a], 2)
        pairs.append((_sentence(f"{s1} {a1}"), _sentence(f"{s2} {a2}")))
    return pairs


def write_negation_task(out_dir: str, seed: int, train: int, eval_: int,
                        val: int = 0) -> dict[str, str]:  # fmt: skip
    """JSON-lines files of the negation task: train, eval (the test set) and,
    when `val` > 0, a validation set for choosing hyperparameters; no
    sentence is in two of them."""
    os.makedirs(out_dir, exist_ok=True)
    splits = {"train": negation_rows(train, seed)}
    seen = {r["text"] for r in splits["train"]}
    for k, (split, n) in enumerate((("eval", eval_), ("val", val)), start=1):
        rows, draw = [], 1
        while len(rows) < n and draw < 50:
            for r in negation_rows(4 * n, seed + 10_000 * k + draw):
                if len(rows) < n and r["text"] not in seen:
                    seen.add(r["text"])
                    rows.append(r)
            draw += 1
        if rows:
            splits[split] = rows
    paths = {}
    for split, rows in splits.items():
        path = os.path.join(out_dir, f"negation_{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        paths[split] = path
    return paths


def write_paraphrase_probe(path: str, n: int, seed: int) -> str:
    """A JSON file {"pairs": [[sentence, paraphrase], ...]}."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"pairs": [list(p) for p in paraphrase_pairs(n, seed)]}, f, indent=1)
    return path
