""""LoRA Learns Less and Forgets Less" (Biderman et al. 2024), instruction-
tuning arm: full fine-tuning against LoRA r=16 and r=256 (every linear layer,
alpha = 2r) on a math instruction set, measuring what each learns (GSM8K) and
forgets (general multiple-choice tasks and general-text perplexity).

On GPUs/TPUs (the paper's model is Llama-2-7B; any HF causal LM works):

    python scripts/sweep.py --config=experiments/llm/learns_less_forgets_less.py --workdir=runs/llfl
    python experiments/llm/harness.py --workdir=runs/llfl       # GSM8K + MC tasks, before/after
    python scripts/report.py --workdir=runs/llfl --target=harness_target \
        --general=harness_general --metric=score

`scripts/sweep.py` trains each run and records, before and after, the loss and
perplexity on held-out MetaMathQA (`math`) and on general text (`general_text`,
WikiText-103 validation, eval-only: never trained on), hence
`forgetting/general_text/loss_increase`, plus the weight-update spectra
(`analysis/*`: the paper's finding that full fine-tuning's update has far
higher rank than LoRA's). `experiments/llm/harness.py` then scores base and
tuned models with the lm-evaluation-harness (through `ftjax.eval.lm_eval_adapter`):
gsm8k as the target, hellaswag, arc_challenge and winogrande as the general
tasks the paper averages for forgetting. The paper's claim to check: LoRA
reaches lower GSM8K accuracy than full fine-tuning and loses less of the
general average. Nothing here is CPU-sized and no run time has been measured:
the defaults are steps=2000 of 32 x 1024 tokens on a 7B model, and
`method=full` at 7B needs FSDP across several GPUs (--config.parallel.mode=fsdp).

Arg keys: those of experiments/llm/sft.py (model, dataset, format, prompt,
completion, steps, batch, seq_len, lr, method and its options, ...) plus
`general_text` (hub id or local file of general text; `general_text_config`,
`general_text_split`) and `harness_include` (a directory of extra harness task
YAMLs, e.g. local stand-ins; then only those tasks are loaded), `target_tasks`,
`general_tasks`, `harness_limit` (examples per task, 0 = all).

Offline (the tests): model=<local checkpoint dir>, dataset=<local jsonl with
query/response>, general_text=<local text file>, harness_include=<dir with local
task YAMLs> and target_tasks/general_tasks naming those tasks.
"""

import importlib.util
import os

from ftjax.errors import ConfigError
from ftjax.experiment import default_eval_config, parse_arg, split_method_options


def _sibling(name: str):
    # Experiment files are loaded by path, not as a package: import sft.py the same way.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"ftjax_llm_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sft = _sibling("sft")

DEFAULTS = {
    **sft.DEFAULTS,
    "model": "meta-llama/Llama-2-7b-hf",
    "dataset": "meta-math/MetaMathQA",
    "dataset_config": "",
    "split": "train",
    "eval_split": "",  # MetaMathQA has only a train split: 5% carved for eval
    "format": "prompt_completion",
    "method": "full",
    "steps": "2000",
    "general_text": "Salesforce/wikitext",
    "general_text_config": "wikitext-103-raw-v1",
    "general_text_split": "validation",
    "harness_include": "",
    "target_tasks": "gsm8k",
    "general_tasks": "hellaswag,arc_challenge,winogrande",
    "harness_limit": "0",
}
FIELDS = {"prompt": "query", "completion": "response", "text": "text"}


def get_config(arg=None):
    args = parse_arg(arg)
    o = sft.take(args, {**DEFAULTS, "tokenizer": ""})
    fields = {k: args.pop(k, v) for k, v in FIELDS.items()}
    method_options, rest = split_method_options(args)
    if rest:
        raise ConfigError(f"config arg: unknown key(s) {sorted(rest)} for this study")
    if o["method"] in ("lora", "qlora"):
        # The paper's LoRA: every linear layer, alpha = 2r.
        method_options.setdefault("targets", "all-linear")
        rank = int(method_options.setdefault("rank", "16"))
        method_options.setdefault("alpha", str(2 * rank))

    cfg = sft.base_config(o)
    cfg.data.eval_fraction = 0.01  # of MetaMathQA's 395k rows: ~4k, capped by max_eval_examples
    cfg.data.sources.math = sft.data_source(
        o["dataset"], dataset_config=o["dataset_config"], split=o["split"],
        eval_split=o["eval_split"], eval_data=o["eval_data"], format=o["format"],
        prompt=fields["prompt"], completion=fields["completion"],
    )  # fmt: skip
    # General text: eval-only (weight 0), its loss before and after is the
    # perplexity half of forgetting.
    cfg.data.sources.general_text = sft.data_source(
        o["general_text"], dataset_config=o["general_text_config"],
        split=o["general_text_split"], format="text", weight=0.0, text=fields["text"],
    )  # fmt: skip
    sft.apply_method(cfg, o["method"], method_options, o["lr"])

    cfg.eval = default_eval_config()
    cfg.eval.exact_match = False  # GSM8K accuracy comes from the harness's answer extraction
    cfg.eval.harness = dict(
        target_tasks=o["target_tasks"],
        general_tasks=o["general_tasks"],
        limit=int(o["harness_limit"]),
        num_fewshot=-1,  # the tasks' defaults
        batch_size=16,
        include_path=o["harness_include"],
        include_defaults=not o["harness_include"],
    )
    cfg.study = dict(name="learns_less_forgets_less", stage="finetune", manifest="")
    return cfg


def get_sweep(arg=None):
    del arg
    return [
        {"arg": "method=full"},
        {"arg": "method=lora,rank=16"},
        {"arg": "method=lora,rank=256"},
    ]
