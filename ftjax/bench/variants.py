"""Named variants of an ftjax benchmark job, timed beside the base job in the
same run (`--variants=lora@hybrid`). A variant changes only what a user can
change too: XLA flags, model config fields (`scan_layers`, `remat`, the
`attention` kernel), `train.loss_chunk` or method options. The benchmark never patches library
modules: a code path worth an A/B is a config option first."""

from __future__ import annotations

VARIANTS: dict = {
    "ynn_off": {"xla_flags": "--xla_cpu_experimental_ynn_fusion_type="},  # Eigen dots
    "ynn_all": {
        "xla_flags": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,individual_dot"
    },
    "onednn": {"xla_flags": "--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type="},
    "scan": {"model": {"scan_layers": True}},
    "hybrid": {"method": {"compute": "hybrid"}},  # LoRA: merged forward, factored grads
    "remat": {"model": {"remat": True}},
    # The whole score matrix, without the causal block kernel that "auto" picks.
    "attention_dense": {"model": {"attention": "xla"}},
    "attention_block": {"model": {"attention": "block"}},
    # Backend kernels (ftjax.models.attention): cuDNN flash attention on GPUs
    # (where its constraints hold, else XLA), Pallas splash attention on TPUs.
    "attention_cudnn": {"model": {"attention": "cudnn"}},
    "attention_splash": {"model": {"attention": "splash"}},
    # The loss over whole float32 logits against chunks of 256 positions.
    "loss_dense": {"loss_chunk": 0},
    "loss_chunked": {"loss_chunk": 256},
}
