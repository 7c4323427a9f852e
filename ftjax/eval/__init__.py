"""Evaluation: loss and perplexity, KV-cache generation, exact-match and
multiple-choice scoring, forgetting. The lm-evaluation-harness adapter lives in
`ftjax.eval.lm_eval_adapter` and is imported on demand (it needs `lm_eval`)."""

from ftjax.eval.forgetting import forgetting
from ftjax.eval.generate import (
    GenerationOutput,
    filter_logits,
    generate,
    generate_text,
    left_pad,
    truncate_at,
)
from ftjax.eval.metrics import (
    batch_sums,
    evaluate_batches,
    evaluate_sets,
    summarize,
    token_log_probs,
)
from ftjax.eval.scoring import (
    Loglikelihoods,
    encode_pair,
    exact_match,
    exact_match_scores,
    loglikelihoods,
    normalize_answer,
    score_multiple_choice,
)

__all__ = [
    "GenerationOutput",
    "Loglikelihoods",
    "batch_sums",
    "encode_pair",
    "evaluate_batches",
    "evaluate_sets",
    "exact_match",
    "exact_match_scores",
    "filter_logits",
    "forgetting",
    "generate",
    "generate_text",
    "left_pad",
    "loglikelihoods",
    "normalize_answer",
    "score_multiple_choice",
    "summarize",
    "token_log_probs",
    "truncate_at",
]
