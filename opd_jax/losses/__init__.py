"""Pure-functional OPD / GKD losses. Every loss returns (loss, metrics) under one masking contract
(see `masking`): only generated tokens count (EOS included), normalised by the real token count,
never 0/0. Derivations: docs/math.md.
"""

from opd_jax.losses.fdiv import KINDS, FDiv, get_fdiv
from opd_jax.losses.masking import clean, masked_mean
from opd_jax.losses.full_vocab import (divergence, divergence_from_logprobs, full_vocab_loss, teacher_topk,
                                       topk_buckets, topk_distill_loss)
from opd_jax.losses.sampled import ESTIMATORS, LEVELS, opd_weights, reward_to_go, sampled_surrogate
from opd_jax.losses.chunked import (chunked_divergence, chunked_divergence_loss, chunked_token_logprobs,
                                    chunked_topk_loss)
from opd_jax.losses.mixing import gkd_loss, group_advantages, rl_opd_surrogate

__all__ = ["KINDS", "FDiv", "get_fdiv", "clean", "masked_mean", "divergence", "divergence_from_logprobs",
           "full_vocab_loss", "teacher_topk", "topk_buckets", "topk_distill_loss", "ESTIMATORS", "LEVELS",
           "opd_weights", "reward_to_go", "sampled_surrogate", "chunked_divergence", "chunked_divergence_loss", "chunked_token_logprobs",
           "chunked_topk_loss", "gkd_loss",
           "group_advantages", "rl_opd_surrogate"]
