"""What fine-tuning did to the weights: update spectra and energy ranks,
intruder dimensions, relative update norms, adapter subspace similarity."""

from ftjax.analysis.spectra import (
    energy_rank,
    intruder_dimensions,
    relative_update_norm,
    singular_values,
    singular_vectors,
    update_spectrum,
    update_stats,
)
from ftjax.analysis.subspace import (
    adapter_factors,
    adapter_subspace_similarity,
    similarity_grid,
    subspace_similarity,
)
from ftjax.analysis.weights import analyze_update, module_name, weight_matrices

__all__ = [
    "adapter_factors",
    "adapter_subspace_similarity",
    "analyze_update",
    "energy_rank",
    "intruder_dimensions",
    "module_name",
    "relative_update_norm",
    "similarity_grid",
    "singular_values",
    "singular_vectors",
    "subspace_similarity",
    "update_spectrum",
    "update_stats",
    "weight_matrices",
]
