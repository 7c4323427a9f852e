"""Trainable-parameter counts of the LoRA paper's settings (Hu et al. 2021).

    python scripts/count_params.py --config=experiments/lora_paper/param_counts.py

prints a markdown table whose `trainable` column reads exactly 393,216
(GPT-2 Medium, r=4), 737,280 (GPT-2 Large, r=4), 4,718,592 (GPT-3 175B, r=1)
and 37,748,736 (GPT-3 175B, r=8), and, from the GLUE table (Table 2),
294,912 (RoBERTa-base, r=8) and 786,432 (RoBERTa-large, r=8), with q and v
adapted: the bare encoder is counted, without the classifier head that each
GLUE task trains in full (ftjax trains it under every method), as the paper
counts. Counts come from
`jax.eval_shape` over the real model configs: no weight is allocated.

`paper` is the figure the paper prints (its Tables 3 and 4 round GPT-2's to
0.35M / 0.77M; the released code and checkpoints give the exact numbers in
`expected`). GPT-2 and GPT-3 fuse q, k, v into one `c_attn` projection; a
rank-r adapter on it has d*r + r*3d parameters, the same count as separate
rank-r adapters on q and v (see ftjax/peft/targets.py).

`arg` picks rows: `param_counts.py:gpt3_r1,gpt3_r8`.
"""

import ml_collections


def _gpt(d: int, layers: int, heads: int, ctx: int) -> dict:
    return dict(
        model_type="gpt2",
        vocab_size=50257,
        hidden_size=d,
        intermediate_size=4 * d,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        max_position_embeddings=ctx,
        hidden_act="gelu_new",
        norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def _roberta(d: int, layers: int) -> dict:
    return dict(
        model_type="roberta",
        vocab_size=50265,
        hidden_size=d,
        intermediate_size=4 * d,
        num_layers=layers,
        num_heads=d // 64,
        num_kv_heads=d // 64,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
        hidden_act="gelu",
        norm_eps=1e-5,
    )


def _row(title, model, rank, expected, paper):
    return ml_collections.ConfigDict(
        dict(
            title=title,
            model=model,
            method=dict(name="lora", rank=rank, alpha=float(rank), targets="qv"),
            expected=expected,
            paper=paper,
        )
    )


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.rows = arg or "roberta_base,roberta_large,gpt2_medium,gpt2_large,gpt3_r1,gpt3_r8"
    config.settings = ml_collections.ConfigDict()
    gpt2_medium = _gpt(1024, 24, 16, 1024)
    gpt2_large = _gpt(1280, 36, 20, 1024)
    gpt3 = _gpt(12288, 96, 96, 2048)
    config.settings.roberta_base = _row(
        "RoBERTa-base, r=8, q+v", _roberta(768, 12), 8, 294_912, "0.3M"
    )
    config.settings.roberta_large = _row(
        "RoBERTa-large, r=8, q+v", _roberta(1024, 24), 8, 786_432, "0.8M"
    )
    config.settings.gpt2_medium = _row("GPT-2 Medium, r=4, q+v", gpt2_medium, 4, 393_216, "0.35M")
    config.settings.gpt2_large = _row("GPT-2 Large, r=4, q+v", gpt2_large, 4, 737_280, "0.77M")
    config.settings.gpt3_r1 = _row("GPT-3 175B, r=1, q+v", gpt3, 1, 4_718_592, "4.7M")
    config.settings.gpt3_r8 = _row("GPT-3 175B, r=8, q+v", gpt3, 8, 37_748_736, "37.7M")
    return config
