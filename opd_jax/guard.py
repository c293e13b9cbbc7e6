"""The EffOPD guard and line search, as a hook above the rollouts.

After an update that extrapolated (the EffOPD transform jumps at the end of every window of K
updates), the hook samples completions of held-out probe prompts (fixed key) and scores candidate
parameters by their exact teacher divergence on those same tokens (`train_step.probe_divergence`):

  guard (optim.effopd_guard):        keep the jump unless D(with jump) > D(without jump)
  line search (effopd_line_search):  the transform jumped exactly d_k (alpha 1); try
                                     p0 + alpha * (p - p0) for alpha in LINE_SEARCH_ALPHAS, keep
                                     the lowest divergence (ties go to the smaller alpha; 0 = no jump)

Only window-end steps read anything back from the devices. `optim/` stays pure optax: this module
receives the optimizer state and the rollouts, and imports nothing above them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opd_jax.errors import OpdError
from opd_jax.optim import find_state, jumped, load_mask, undo_jump
from opd_jax.rollouts import PROBE_STREAM
from opd_jax.train_step import probe_divergence

LINE_SEARCH_ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0)
PROBE_KEY = 2**31 - 1  # the probe completions' key: fold_in(run key, PROBE_KEY)


def check_guard(oc, has_teachers: bool) -> bool:
    """Whether the guard is on; one-line errors for settings it cannot honour."""
    if not (oc.effopd_guard or oc.effopd_line_search):
        return False
    what = "optim.effopd_line_search" if oc.effopd_line_search else "optim.effopd_guard"
    if oc.effopd_window <= 0:
        raise OpdError(f"{what} needs EffOPD on (optim.effopd_window > 0)")
    if oc.accumulate > 1:
        raise OpdError(f"{what} does not support optim.accumulate > 1; set one of them off")
    if not has_teachers:
        raise OpdError(f"{what} measures the teacher divergence, so it needs teachers")
    return True


class EffOPDGuard:
    def __init__(self, rollouts, graphdef, spec, teacher_w, param_sh, oc, key, params):
        self.rollouts, self.graphdef, self.spec, self.param_sh, self.oc = rollouts, graphdef, spec, param_sh, oc
        self.teacher_w = teacher_w or {n: t.output_matrix() for n, t in rollouts.teachers.items()}
        self.key = jax.random.fold_in(key, PROBE_KEY)
        self.examples = rollouts.source.batch(0, oc.effopd_probe_per_domain, stream=PROBE_STREAM)
        self.mask = load_mask(oc.mask, params) if oc.mask else None
        self.shifted = False  # a skipped update moved the window's end off the multiples of K

    def probe(self, params, tokens_from=None):
        """Exact teacher divergence of `params` on the probe prompts; completions sampled (fixed key)
        from `tokens_from` (default `params`) so two parameter sets are compared on the same tokens.
        -> (divergence, the probe batch)."""
        if tokens_from is None:
            tokens_from = self.rollouts.probe_batch(params, self.examples, self.key)
        return float(probe_divergence(self.graphdef, params, tokens_from, self.teacher_w, spec=self.spec)), tokens_from

    def after_step(self, ctx):
        # the transform jumps only at a window's end: read the device there, and after a skipped update
        # (which shifts the window) every step until the shifted window closes
        if not self.shifted and ctx.done % self.oc.effopd_window:
            return
        st = find_state(ctx.state.opt_state)
        if st is None:
            return
        did = bool(jumped(st))
        self.shifted = not did and int(st.count) != 0
        if not did:
            return
        params = ctx.state.params
        without = undo_jump(params, st, self.mask)
        before, probe_batch = self.probe(without)
        if self.oc.effopd_line_search:
            best, rec = self._line_search(params, without, before, probe_batch, float(st.cosine))
        else:
            after, _ = self.probe(params, probe_batch)
            rolled = after > before
            best = without if rolled else params
            rec = {"effopd/alpha": float(st.alpha), "effopd/cosine": float(st.cosine), "effopd/probe_before": before,
                   "effopd/probe_after": after, "effopd/rolled_back": float(rolled)}
        if best is not params:
            ctx.state = ctx.state._replace(params=jax.device_put(best, self.param_sh))
        ctx.record.update(rec)

    def _line_search(self, params, without, before: float, probe_batch, cosine: float):
        jump = jax.tree.map(lambda p, w: p.astype(jnp.float32) - w.astype(jnp.float32), params, without)
        at = lambda a: jax.tree.map(lambda w, d: (w.astype(jnp.float32) + a * d).astype(w.dtype), without, jump)  # noqa: E731
        scores = {0.0: before}
        for a in LINE_SEARCH_ALPHAS[1:]:
            scores[a], _ = self.probe(at(a), probe_batch)
        best = min(scores, key=lambda a: (scores[a], a))
        return at(best), {"effopd/alpha": best, "effopd/cosine": cosine, "effopd/probe_before": before,
                          "effopd/probe_after": scores[best], "effopd/rolled_back": float(best == 0.0),
                          **{f"effopd/probe_alpha_{a:g}": v for a, v in scores.items()}}
