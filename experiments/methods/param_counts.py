"""Trainable-parameter counts of every method on Llama-2-7B's shapes, each
checked against its closed form (written here from the dimensions, not from
ftjax's counting code).

    python scripts/count_params.py --config=experiments/methods/param_counts.py

Llama-2-7B: hidden d = 4096, MLP width f = 11008, 32 layers, no biases,
6,738,415,616 parameters (the `full` row checks the model's count too).

`arg` picks rows: `param_counts.py:lora_qv,ia3`.
"""

import ml_collections

D, F, LAYERS, VOCAB = 4096, 11008, 32, 32000
MODEL = dict(
    vocab_size=VOCAB,
    hidden_size=D,
    intermediate_size=F,
    num_layers=LAYERS,
    num_heads=32,
    num_kv_heads=32,
    max_position_embeddings=4096,
)
# (in, out) of every linear layer of one decoder layer.
ATTENTION = [(D, D)] * 4  # q, k, v, o
MLP = [(D, F), (D, F), (F, D)]  # gate, up, down
LINEAR = ATTENTION + MLP
QV = [(D, D), (D, D)]
LAYER_PARAMS = sum(i * o for i, o in LINEAR) + 2 * D  # + two RMSNorm scales
TOTAL = LAYERS * LAYER_PARAMS + 2 * VOCAB * D + D  # + embeddings, head, final norm


def _per_layer(fn, shapes):
    return LAYERS * sum(fn(i, o) for i, o in shapes)


def _lokr_factor(n: int) -> tuple[int, int]:
    """PEFT's default LoKr split of n: the factor pair nearest the square root."""
    m = int(n**0.5)
    while n % m:
        m -= 1
    return m, n // m


def _lokr(i, o, r):
    (a_out, b_out), (a_in, b_in) = _lokr_factor(o), _lokr_factor(i)
    w1 = a_out * a_in  # the small factor stays full
    w2 = r * (b_out + b_in) if r < max(b_out, b_in) / 2 else b_out * b_in
    return w1 + w2


SETTINGS = {
    "full": ("full", {"name": "full"}, TOTAL),
    "lora_qv": (
        "LoRA r=8, q+v",
        {"name": "lora", "rank": 8},
        _per_layer(lambda i, o: 8 * (i + o), QV),
    ),
    "lora_all": (
        "LoRA r=16, all linear",
        {"name": "lora", "rank": 16, "targets": "all-linear"},
        _per_layer(lambda i, o: 16 * (i + o), LINEAR),
    ),
    "dora_all": (
        "DoRA r=16, all linear (+ one magnitude per output)",
        {"name": "dora", "rank": 16, "targets": "all-linear"},
        _per_layer(lambda i, o: 16 * (i + o) + o, LINEAR),
    ),
    "ia3": (
        "IA3: k, v (outputs) and down projection (input)",
        {"name": "ia3"},
        LAYERS * (D + D + F),
    ),
    "vera": (
        "VeRA r=256, q+v (lambda_d: r, lambda_b: out)",
        {"name": "vera", "rank": 256},
        _per_layer(lambda i, o: 256 + o, QV),
    ),
    "loha": (
        "LoHa r=8, q+v (two factor pairs)",
        {"name": "loha", "rank": 8},
        _per_layer(lambda i, o: 2 * 8 * (i + o), QV),
    ),
    "lokr": (
        "LoKr r=8, q+v (64x64 full factor, rank-8 second factor)",
        {"name": "lokr", "rank": 8},
        _per_layer(lambda i, o: _lokr(i, o, 8), QV),
    ),
    "oft": (
        "OFT b=32, q+v (in/32 blocks, each 32·31/2 packed skew entries)",
        {"name": "oft"},
        _per_layer(lambda i, o: (i // 32) * (32 * 31 // 2), QV),
    ),
    "adalora": (
        "AdaLoRA init_r=12, q+v (A, E, B: r (in + out + 1); ranknum is a buffer)",
        {"name": "adalora"},
        _per_layer(lambda i, o: 12 * (i + o + 1), QV),
    ),
    "galore": (
        "GaLore (every weight trains; its saving is optimizer state)",
        {"name": "galore"},
        TOTAL,
    ),
    "qlora": (
        "QLoRA r=16, all linear (NF4 base; the adapters train)",
        {"name": "qlora", "rank": 16},
        _per_layer(lambda i, o: 16 * (i + o), LINEAR),
    ),
    "prompt_tuning": (
        "prompt tuning, 20 virtual tokens (20 x d)",
        {"name": "prompt_tuning", "num_virtual_tokens": 20},
        20 * D,
    ),
    "prefix_tuning": (
        "prefix tuning, 20 tokens (a key and a value per layer: 20 x 2 x layers x d)",
        {"name": "prefix_tuning", "num_virtual_tokens": 20},
        20 * 2 * LAYERS * D,
    ),
    "bitfit": ("BitFit (no biases: the norm scales)", {"name": "bitfit"}, LAYERS * 2 * D + D),
    "freeze": (
        "freeze all but the last layer",
        {"name": "freeze", "last_layers": 1},
        LAYER_PARAMS,
    ),
}


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.rows = arg or ",".join(SETTINGS)
    config.settings = ml_collections.ConfigDict()
    for name, (title, method, expected) in SETTINGS.items():
        # `freeze` picks numbered layers, so its model is counted unscanned.
        model = {**MODEL, "scan_layers": False} if method["name"] == "freeze" else MODEL
        config.settings[name] = ml_collections.ConfigDict(
            dict(title=title, model=model, method=method, expected=int(expected), paper="")
        )
    return config
