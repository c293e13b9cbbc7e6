"""Optimizers for OPD (optax transforms and the config factory)."""

from opd_jax.optim.factory import make_optimizer, make_schedule

__all__ = ["make_optimizer", "make_schedule"]
