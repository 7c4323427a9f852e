"""Evaluation: loss and perplexity, KV-cache generation, exact-match and
multiple-choice scoring, forgetting. The lm-evaluation-harness adapter lives in
`ftjax.eval.lm_eval_adapter` and is imported on demand (it needs `lm_eval`)."""

from ftjax.eval.forgetting import forgetting, lower_is_better, metric_change
from ftjax.eval.generate import (
    GenerationOutput,
    encode_prompts,
    filter_logits,
    generate,
    generate_answers,
    generate_text,
    left_pad,
    truncate_at,
)
from ftjax.eval.metrics import (
    SUMMARY_NAMES,
    batch_sums,
    evaluate_batches,
    evaluate_sets,
    flatten_sets,
    perplexity,
    summarize,
    token_log_probs,
    unflatten_sets,
)
from ftjax.eval.scoring import (
    Loglikelihoods,
    encode_pair,
    exact_match,
    exact_match_on,
    exact_match_scores,
    loglikelihoods,
    normalize_answer,
    score_multiple_choice,
    strip_whitespace,
)

__all__ = [
    "SUMMARY_NAMES",
    "GenerationOutput",
    "Loglikelihoods",
    "batch_sums",
    "encode_pair",
    "encode_prompts",
    "evaluate_batches",
    "evaluate_sets",
    "exact_match",
    "exact_match_on",
    "exact_match_scores",
    "filter_logits",
    "flatten_sets",
    "forgetting",
    "generate",
    "generate_answers",
    "generate_text",
    "left_pad",
    "loglikelihoods",
    "lower_is_better",
    "metric_change",
    "normalize_answer",
    "perplexity",
    "score_multiple_choice",
    "strip_whitespace",
    "summarize",
    "token_log_probs",
    "truncate_at",
    "unflatten_sets",
]
