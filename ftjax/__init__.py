"""ftjax: measure what full and parameter-efficient fine-tuning do to a
language model, in JAX. See README.md and ../shared/DESIGN.md."""

import os as _os

# transformers prints "PyTorch was not found..." at import when torch is
# absent: ftjax never needs torch models, so the advice only misleads. This
# silences transformers' advisory warnings, nothing else.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
