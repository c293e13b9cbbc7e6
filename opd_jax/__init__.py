"""opd_jax: on-policy distillation of language models in JAX / Flax NNX."""

from opd_jax.errors import OpdError
from opd_jax.models import ModelConfig, Transformer, load_model, save_model, init_model
from opd_jax.engine import generate
from opd_jax.sampling import Rollout

__version__ = "0.1.0"
__all__ = ["OpdError", "ModelConfig", "Transformer", "load_model", "save_model", "init_model",
           "Rollout", "generate", "__version__"]
