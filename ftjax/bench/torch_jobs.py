"""The PyTorch jobs timed beside ftjax's: transformers' Llama of the same shape
(with PEFT's LoRA) trained by torch's AdamW on the same batch, and its
`generate`. On the CPU; torch, transformers and peft load in the worker only."""

from __future__ import annotations

import platform
import time

from .config import PEAK_TRIES, optim_config
from .jobs import InferStep, TrainStep, best_time, synthetic_batch
from .memory import reset_rss_peak, rss_bytes


class TorchJob:
    def __init__(self, spec: dict):
        import torch
        import transformers

        self.spec, self.torch, self.transformers = spec, torch, transformers
        self.rss_base = rss_bytes()["rss"]
        m = spec["model"]
        self.hf_config = transformers.LlamaConfig(
            vocab_size=m["vocab_size"],
            hidden_size=m["hidden_size"],
            intermediate_size=m["intermediate_size"],
            num_hidden_layers=m["num_layers"],
            num_attention_heads=m["num_heads"],
            num_key_value_heads=m["num_kv_heads"],
            max_position_embeddings=m["max_position_embeddings"],
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        )
        self.autocast = m["dtype"] == "bfloat16"  # mixed precision like ftjax's dtype/param_dtype
        self.ids = torch.from_numpy(
            synthetic_batch(m["vocab_size"], spec["batch"], spec["seq"])["input_ids"]
        ).long()

    def _env(self) -> dict:
        import peft

        return {
            "backend": "cpu",
            "device": platform.processor() or "cpu",
            "threads": self.torch.get_num_threads(),
            "versions": {
                "torch": self.torch.__version__,
                "transformers": self.transformers.__version__,
                "peft": peft.__version__,
            },
        }

    def _model(self):
        self.torch.manual_seed(0)
        model = self.transformers.LlamaForCausalLM(self.hf_config)
        return model

    def _init_peak(self):
        n = self.spec.get("peak_matmul") or 2048
        dtype = self.torch.bfloat16 if self.autocast else self.torch.float32
        self._mm_args = [self.torch.randn(n, n, dtype=dtype) for _ in range(2)]
        self._peak_flops_per_call = 2.0 * n**3
        self.torch.mm(*self._mm_args)

    def measure_peak(self) -> float:
        mm = lambda: self.torch.mm(*self._mm_args)
        return self._peak_flops_per_call / best_time(mm, PEAK_TRIES)

    def _memory(self) -> dict:
        return {"rss_base": self.rss_base, **rss_bytes()}


class TorchTrain(TrainStep, TorchJob):
    def setup(self) -> dict:
        torch = self.torch
        model = self._model()
        if self.spec["method"] == "lora":
            import peft

            lora = peft.LoraConfig(
                r=self.spec["rank"],
                lora_alpha=self.spec["alpha"],
                target_modules="all-linear",  # every Linear but the output head, as ftjax's preset
                lora_dropout=0.0,
            )
            model = peft.get_peft_model(model, lora)
        elif self.spec["method"] != "full":
            raise ValueError(f"torch column: method {self.spec['method']!r} is not benchmarked")
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        o = optim_config()
        self.opt = torch.optim.AdamW(
            self.params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
        )
        self.targets = torch.roll(self.ids, -1, dims=1)
        t = time.perf_counter()
        self._step()  # eager: the first step allocates optimizer state and caches
        first = time.perf_counter() - t
        self.state_bytes = {
            "trainable": sum(p.numel() * p.element_size() for p in self.params),
            "frozen": sum(
                p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad
            ),
            "opt_state": sum(
                v.numel() * v.element_size()
                for s in self.opt.state.values()
                for v in s.values()
                if torch.is_tensor(v)
            ),
        }
        if self.spec.get("measure_peak", True):
            self._init_peak()
        self.peak_reset = reset_rss_peak()
        return {
            **self._env(),
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in self.params),
            "compile_s": first,
            "state_bytes": self.state_bytes,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        }

    def _step(self):
        torch = self.torch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=self.ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), self.targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, optim_config().clip_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())

    def finish(self) -> dict:
        return {"loss": self.loss, "peak_reset": self.peak_reset, **self._memory()}


class TorchInfer(InferStep, TorchJob):
    def setup(self) -> dict:
        self.model = self._model().eval()
        t = time.perf_counter()
        self._generate(1)
        return {**self._env(), "compile_s": time.perf_counter() - t}

    def _generate(self, n: int):
        with self.torch.inference_mode():
            self.model.generate(
                self.ids,
                attention_mask=self.torch.ones_like(self.ids),
                max_new_tokens=n,
                min_new_tokens=n,  # no early stop at EOS: both frameworks decode n tokens
                do_sample=False,
                pad_token_id=0,
            )

    def finish(self) -> dict:
        return self._memory()
