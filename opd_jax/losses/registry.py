"""The estimator registry: for each way of forming the OPD loss, what a teacher must hand over, the
abstract shape of that hand-over (the planner compiles with it) and the loss itself.

    name      teacher hands over                       loss
    full      hidden states [rows, N, D_t] (+ W_t)     exact chunked D_f over the vocabulary
    topk      hidden states [rows, N, D_t] (+ W_t)     D_f over the teacher's top k + a tail bucket
    sampled   log q(y_t) of the sampled tokens [B, N]  OPD+ / stop-grad surrogate (token or sequence)
    rl        log q(y_t) of the sampled tokens [B, N]  GRPO reward advantage mixed with (or replaced by)
                                                       the OPD term

`estimator_for(lc)` picks one from a loss config; nothing else in the package branches on
`loss.estimator_type`. Every loss takes the student's completion hidden states h [B, N, D], its
output matrix w [D, V], the batch and the teacher's hand-over, and returns (loss, metrics) under the
masking contract of `masking`; its metrics include "token_logprob" [B, N] (log pi(y_t) of the sampled
tokens, no gradient) for the sampler/trainer mismatch, so no estimator pays a second vocabulary pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from opd_jax.errors import OpdError
from opd_jax.losses.chunked import chunked_divergence_loss, chunked_token_logprobs, chunked_topk_loss
from opd_jax.losses.fdiv import get_fdiv
from opd_jax.losses.full_vocab import topk_distill_loss
from opd_jax.losses.mixing import rl_opd_surrogate
from opd_jax.losses.sampled import sampled_surrogate
from opd_jax.losses.xtok import xtok_divergence_loss


@dataclass(frozen=True)
class Estimator:
    """name; `teacher_output`: "hidden" (final hidden states, the loss applies the teacher's output
    matrix chunk by chunk) or "logprobs" (the sampled tokens' log-probs); `loss(h, w, part, teacher,
    teacher_w, lc, *, group_size, temperature, is_cap=0.0, handover="", cross=False)` -> (loss, metrics);
    part: a `batch.Part`; is_cap > 0 (asynchronous runs) weights the sampled-token and RL terms by truncated
    importance weights; handover: what the teacher gave when not hidden states with `teacher_w` ("topk": its
    top k (log-probs, ids) [B, N, k], chunked; otherwise full logits [B, N, V] or a top-k of any size on
    materialised student logits, for small models and hand-built batches); cross: the teacher scores in its
    own tokens (`teacher_w` is {"w", "map"})."""

    name: str
    teacher_output: str
    loss: Callable

    def teacher_shape(self, rows: int, n_new: int, hidden: int, dtype) -> jax.ShapeDtypeStruct:
        """The abstract hand-over of one teacher for `rows` rows of `n_new` completion tokens."""
        if self.teacher_output == "hidden":
            return jax.ShapeDtypeStruct((rows, n_new, hidden), dtype)
        return jax.ShapeDtypeStruct((rows, n_new), jnp.float32)


def _div(lc) -> dict:
    return dict(kind=lc.kind, beta=lc.beta, alpha=lc.alpha_div)


def _full(h, w, b, teacher, teacher_w, lc, *, group_size, temperature, is_cap=0.0, handover="", cross=False):
    """Exact D_f per position; without `teacher_w`, `teacher` is full logits [B, N, V] (small models);
    teacher_w {"w", "map"}: a teacher with its own tokenizer (`losses.xtok`, loss.cross_tokenizer)."""
    if cross:
        return _cross(h, w, b, teacher, teacher_w, lc, temperature, topk=0)
    t = dict(teacher_hidden=teacher, teacher_w=teacher_w) if teacher_w is not None else dict(teacher_logits=teacher)
    return chunked_divergence_loss(h, w, b.mask, temperature=temperature, normalize=lc.normalize,
                                   seq_chunk=lc.seq_chunk, ids=b.tokens[:, -b.mask.shape[1]:], **t, **_div(lc))


def _topk(h, w, b, teacher, teacher_w, lc, *, group_size, temperature, is_cap=0.0, handover="", cross=False):
    """Teacher top-k + tail bucket; without `teacher_w`, `teacher` is (log-probs, ids) [B, N, k]."""
    comp = b.tokens[:, -b.mask.shape[1]:]
    if cross:
        return _cross(h, w, b, teacher, teacher_w, lc, temperature, topk=lc.topk)
    if teacher_w is not None:
        return chunked_topk_loss(h, w, teacher, teacher_w, b.mask, lc.topk, temperature=temperature,
                                 normalize=lc.normalize, seq_chunk=lc.seq_chunk, ids=comp, top_from=lc.topk_from,
                                 **_div(lc))
    if handover == "topk":  # a served hand-over: chunked, no [B, N, V]
        return chunked_topk_loss(h, w, None, None, b.mask, lc.topk, temperature=temperature,
                                 normalize=lc.normalize, seq_chunk=lc.seq_chunk, ids=comp, teacher_topk=teacher,
                                 top_from=lc.topk_from, **_div(lc))
    if lc.topk_from == "student":
        raise OpdError("loss.topk_from=student needs the teacher's hidden states, not a top-k hand-over")
    logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    loss, m = topk_distill_loss(logits, teacher[0], teacher[1], b.mask, temperature=temperature,
                                normalize=lc.normalize, **_div(lc))
    lp = jax.nn.log_softmax(logits / temperature, -1)
    m["token_logprob"] = jax.lax.stop_gradient(jnp.take_along_axis(lp, comp[..., None], -1)[..., 0])
    return loss, m


def _cross(h, w, b, teacher, teacher_w, lc, temperature, *, topk):
    return xtok_divergence_loss(h, w, teacher, teacher_w["w"], teacher_w["map"], b.mask, lc.cross_tokenizer,
                                temperature=temperature, normalize=lc.normalize, seq_chunk=lc.seq_chunk,
                                ids=b.tokens[:, -b.mask.shape[1]:], topk=topk, top_from=lc.topk_from, **_div(lc))


def _student_logprobs(h, w, b, lc, temperature):
    return chunked_token_logprobs(h, w, b.tokens[:, -b.mask.shape[1]:], temperature=temperature,
                                  seq_chunk=lc.seq_chunk)


def _seqs(b):
    """A packed part's (seq_index, sequences) for the sums that run along a sequence; None when padded."""
    return (b.seq_index, b.seq_tokens.shape[0]) if b.packed else None


def _sampled(h, w, b, teacher, teacher_w, lc, *, group_size, temperature, is_cap=0.0, handover="", cross=False):
    slp = _student_logprobs(h, w, b, lc, temperature)
    loss, m = sampled_surrogate(slp, teacher, b.mask, estimator=lc.estimator, level=lc.level,
                                baseline=lc.baseline, sampler_logprobs=b.sampler_logprobs,
                                clip_eps=lc.clip_eps, normalize=lc.normalize, is_cap=is_cap, seqs=_seqs(b), **_div(lc))
    m["token_logprob"] = jax.lax.stop_gradient(slp)
    return loss, m


def _rl(h, w, b, teacher, teacher_w, lc, *, group_size, temperature, is_cap=0.0, handover="", cross=False):
    slp = _student_logprobs(h, w, b, lc, temperature)
    loss, m = rl_opd_surrogate(slp, teacher, b.rewards, b.mask, group_size=group_size, alpha=lc.rl_alpha,
                               mode=lc.rl_mode, kind=lc.kind, estimator=lc.estimator, beta=lc.beta,
                               div_alpha=lc.alpha_div, sampler_logprobs=b.sampler_logprobs,
                               clip_eps=lc.clip_eps, normalize=lc.normalize, is_cap=is_cap, seqs=_seqs(b))
    m["token_logprob"] = jax.lax.stop_gradient(slp)
    return loss, m


ESTIMATORS = {e.name: e for e in (Estimator("full", "hidden", _full), Estimator("topk", "hidden", _topk),
                                  Estimator("sampled", "logprobs", _sampled), Estimator("rl", "logprobs", _rl))}
ESTIMATOR_TYPES = ("full", "sampled", "topk")  # loss.estimator_type; "rl" follows from loss.rl_alpha / rl_mode


def uses_rl(lc) -> bool:
    """Whether the loss mixes in (or is replaced by) a GRPO reward advantage."""
    return lc.rl_alpha < 1.0 or lc.rl_mode == "replace"


def needs_teachers(lc) -> bool:
    """Pure reward RL (GRPO, rl_alpha = 0, mixed) on on-policy data is the one mode without teachers."""
    return not (lc.lam == 1 and lc.rl_mode == "mix" and lc.rl_alpha == 0)


def check_loss_config(lc):
    """One-line errors for a loss config no estimator can run."""
    if lc.estimator_type not in ESTIMATOR_TYPES:
        raise OpdError(f"loss.estimator_type must be one of {ESTIMATOR_TYPES}, got {lc.estimator_type!r}")
    if uses_rl(lc) and lc.estimator_type != "sampled":
        raise OpdError("RL + OPD (loss.rl_alpha < 1 or rl_mode=replace) needs loss.estimator_type=sampled")
    if not 0.0 <= lc.lam <= 1.0:
        raise OpdError(f"loss.lam must be in [0, 1], got {lc.lam}")
    if lc.topk_from not in ("teacher", "student"):
        raise OpdError(f"config loss.topk_from must be teacher or student, got {lc.topk_from!r}")
    get_fdiv(lc.kind, beta=lc.beta, alpha=lc.alpha_div)


def handover(cfg) -> str:
    """What the run's teachers hand the update: "hidden" (final hidden states + output matrices),
    "topk" (log-probs and ids of the teacher's top loss.topk, in batch row order) or "logprobs" (the
    sampled tokens'). A teacher behind a server (teachers[].url) sends top-k or log-probs, so with one
    the topk estimator takes "topk" from every teacher and the exact full-vocabulary one is refused. A run
    without teachers (pure reward RL) hands over nothing and says "logprobs", the cheapest shape."""
    if not needs_teachers(cfg.loss):
        return "logprobs"
    out = estimator_for(cfg.loss).teacher_output
    served = [t.name for t in cfg.teachers if getattr(t, "url", None)]
    if served and out == "hidden":
        if cfg.loss.estimator_type != "topk":
            raise OpdError(f"teacher {served[0]!r} is served (url): a server hands over top-k or sampled-token "
                           "log-probs, not hidden states; use loss.estimator_type topk or sampled")
        if cfg.loss.topk_from == "student":
            raise OpdError(f"teacher {served[0]!r} is served (url): it hands over its own top k, not its log-probs at "
                           "the student's top k; use loss.topk_from teacher")
        return "topk"
    return out


def estimator_for(lc) -> Estimator:
    """The registry entry a loss config selects (checked)."""
    check_loss_config(lc)
    return ESTIMATORS["rl" if uses_rl(lc) else lc.estimator_type]
