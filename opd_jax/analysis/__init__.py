"""Update analysis: sparsity, per-module movement, spectra and subspace geometry of parameter updates."""

from opd_jax.analysis.spectral import (effective_rank, energy_fraction, numerical_rank, singular_values,
                                       subspace_overlap, top_left_subspace, top_singular)
from opd_jax.analysis.updates import (MODULE_TYPES, alignment_series, analyze_update, changed, flatten_params,
                                      near_zero_preference)

__all__ = ["effective_rank", "energy_fraction", "numerical_rank", "singular_values", "subspace_overlap",
           "top_left_subspace", "top_singular", "MODULE_TYPES", "alignment_series", "analyze_update", "changed", "flatten_params",
           "near_zero_preference"]
