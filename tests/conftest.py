"""Shared fixtures. Eight simulated CPU devices are requested before JAX is
imported anywhere, so the parallelism tests can build meshes. Shared helpers
that are not fixtures (tiny models, tokenizers, the script runner) are in
hf_fixtures.py."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The synthetic suite's character tokenizer (`ftjax.data.synthetic`), loaded."""
    from ftjax.data.synthetic import build_char_tokenizer
    from ftjax.data.tokenize import load_tokenizer

    return load_tokenizer(build_char_tokenizer(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(family)`: the directory of a random tiny Hugging Face
    checkpoint (`hf_fixtures.save_tiny`), written once per session. Tests only
    read it; one that damages a checkpoint writes its own."""
    from hf_fixtures import save_tiny

    saved = {}

    def get(family: str) -> str:
        if family not in saved:
            saved[family] = save_tiny(family, tmp_path_factory.mktemp(family))
        return saved[family]

    return get
