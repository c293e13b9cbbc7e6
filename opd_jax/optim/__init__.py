"""Optimizers for OPD: the config factory, EffOPD extrapolation, sparse-subnetwork masks."""

from opd_jax.optim.factory import make_optimizer, make_schedule
from opd_jax.optim.effopd import EffOPDState, effopd, find_state, jumped, undo_jump
from opd_jax.optim.precision import with_state_dtype
from opd_jax.optim.masks import (load_mask, mask_density, mask_from_patterns, mask_from_small_weights,
                                 mask_from_update, masked_optimizer, random_mask, save_mask)

__all__ = ["make_optimizer", "make_schedule", "EffOPDState", "effopd", "find_state", "jumped", "undo_jump", "load_mask", "mask_density",
           "mask_from_patterns", "mask_from_small_weights", "mask_from_update", "masked_optimizer", "random_mask",
           "save_mask", "with_state_dtype"]
