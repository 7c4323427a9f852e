"""Data pipeline: sources, formats, tokenization, packing, deterministic
resumable batches, statistics, and the built-in synthetic task suite."""

from ftjax.data.batching import BATCH_KEYS, mixture_quotas, pack_rows, process_slice
from ftjax.data.config import (
    FORMATS,
    SourceSpec,
    default_data_config,
    source_config,
    validate_data_config,
)
from ftjax.data.errors import DataConfigError, DataError
from ftjax.data.formats import chat_pieces, encode_rows
from ftjax.data.pipeline import Pipeline, build_pipeline
from ftjax.data.sources import carve_eval, load_hub, load_local, load_source
from ftjax.data.stats import stats_line
from ftjax.data.synthetic import (
    build_char_tokenizer,
    suite_data_config,
    write_suite,
)
from ftjax.data.tokenize import Examples, load_tokenizer, tokenize_split

__all__ = [
    "BATCH_KEYS",
    "FORMATS",
    "DataConfigError",
    "DataError",
    "Examples",
    "Pipeline",
    "SourceSpec",
    "build_char_tokenizer",
    "build_pipeline",
    "carve_eval",
    "chat_pieces",
    "default_data_config",
    "encode_rows",
    "load_hub",
    "load_local",
    "load_source",
    "load_tokenizer",
    "mixture_quotas",
    "pack_rows",
    "process_slice",
    "source_config",
    "stats_line",
    "suite_data_config",
    "tokenize_split",
    "validate_data_config",
    "write_suite",
]
