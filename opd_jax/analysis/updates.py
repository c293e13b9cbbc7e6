"""Where an update moved the weights: sparsity, per-module movement, spectra, geometry.

For two parameter trees theta0 (before) and theta1 (after) in this project's layout (stacked layers
on axis 0), each matrix W is analysed per layer as a 2-D matrix (inputs x outputs).

* sparsity: fraction of coordinates with |dW| <= tol, tol = eps(dtype) * |W0| (one rounding step:
  2^-8 relative for bfloat16, 2^-23 for float32), so a coordinate that only re-rounded counts as still;
* relative movement ||dW||_F / ||W0||_F by module type and by layer;
* sparsity_bfloat16: the same at bfloat16's rounding step (what the update would look like stored in
  bfloat16, the papers' setting), whatever the weights' own dtype;
* numerical rank, effective rank and top-k energy fraction of dW (from all its singular values: an
  exact SVD up to min(shape) = 2048; a larger matrix gets only the subspace overlap, its rank and
  energy are left out rather than read off the top k);
* overlap of dW's top-k left singular subspace with W0's;
* near-zero preference: P(updated | |W0| in its lowest decile) / P(updated) (1 = no preference), with
  "updated" at the weights' own dtype and at bfloat16 resolution (near_zero_preference_bfloat16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.analysis import spectral as sp

MODULE_TYPES = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_o", "bq": "attn_bias", "bk": "attn_bias",
                "bv": "attn_bias", "q_norm": "norm", "k_norm": "norm", "attn_norm": "norm", "mlp_norm": "norm",
                "w_gate": "mlp_gate", "w_up": "mlp_up", "w_down": "mlp_down", "embed": "embedding",
                "lm_head": "embedding", "final_norm": "norm"}
_EPS = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -23}


def changed(w0, w1, dtype: str | None = None):
    """Bool mask of coordinates that moved by more than one rounding step of their dtype."""
    eps = _EPS.get(dtype or str(jnp.asarray(w0).dtype), 2.0 ** -23)
    a0, a1 = jnp.asarray(w0, jnp.float32), jnp.asarray(w1, jnp.float32)
    return jnp.abs(a1 - a0) > eps * jnp.maximum(jnp.abs(a0), 1e-30)


def near_zero_preference(w0, moved, quantile: float = 0.1) -> float:
    """P(moved | |W0| in its lowest `quantile`) / P(moved); 1.0 for a mask independent of |W0|."""
    a = np.abs(np.asarray(w0, np.float32)).ravel()
    m = np.asarray(moved).ravel()
    if m.mean() == 0:
        return float("nan")
    low = a <= np.quantile(a, quantile)
    return float(m[low].mean() / m.mean())


def as_matrix(name: str, w):
    """One layer's tensor as a 2-D matrix (inputs x outputs) in this project's layout, or None (1-D)."""
    if w.ndim < 2:
        return None
    if name == "wo":
        return w.reshape(-1, w.shape[-1])
    return w.reshape(w.shape[0], -1)


def _layers(name, w, n_layers):
    """[(layer index or None, array)] splitting stacked layer parameters."""
    if name in ("embed", "lm_head", "final_norm"):
        return [(None, w)]
    return [(i, w[i]) for i in range(n_layers)]


def flatten_params(params) -> dict[str, jax.Array]:
    """{'embed': ..., 'wq': [L, ...], ...} from a pure-dict parameter tree of `Transformer`."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        out[str(getattr(path[-1], "key", path[-1]))] = x
    return out


def analyze_update(p0, p1, *, k: int = 8, dtype: str | None = None, key=None) -> dict:
    """Statistics of theta1 - theta0 (pure-dict parameter trees of the same model)."""
    f0, f1 = flatten_params(p0), flatten_params(p1)
    n_layers = next(v.shape[0] for n, v in f0.items() if n == "wq")
    key = key if key is not None else jax.random.key(0)
    per_matrix, module, layer = [], {}, {}
    total = moved_total = moved_bf16 = 0
    nz, nz_bf16 = [], []
    for name in sorted(f0):
        for li, (w0, w1) in zip([l for l, _ in _layers(name, f0[name], n_layers)],
                                zip([a for _, a in _layers(name, f0[name], n_layers)],
                                    [a for _, a in _layers(name, f1[name], n_layers)])):
            d = jnp.asarray(w1, jnp.float32) - jnp.asarray(w0, jnp.float32)
            mv = changed(w0, w1, dtype)
            n_moved = int(jnp.sum(mv))
            total += mv.size
            moved_total += n_moved
            mv_bf16 = changed(w0, w1, "bfloat16")
            moved_bf16 += int(jnp.sum(mv_bf16))
            d2, w2 = float(jnp.sum(d * d)), float(jnp.sum(jnp.asarray(w0, jnp.float32) ** 2))
            mt = MODULE_TYPES.get(name, name)
            module.setdefault(mt, [0.0, 0.0])
            module[mt][0] += d2
            module[mt][1] += w2
            if li is not None:
                layer.setdefault(li, {}).setdefault(mt, [0.0, 0.0])
                layer[li][mt][0] += d2
                layer[li][mt][1] += w2
            rec = {"name": name, "layer": li, "module": mt, "sparsity": 1.0 - n_moved / mv.size,
                   "relative_movement": float(np.sqrt(d2 / max(w2, 1e-30)))}
            m_d, m_w = as_matrix(name, d), as_matrix(name, jnp.asarray(w0, jnp.float32))
            if m_d is not None and float(jnp.max(jnp.abs(m_d))) > 0:
                kk = min(k, *m_d.shape)
                key, k1, k2 = jax.random.split(key, 3)
                u_d, s = sp.top_left_subspace(m_d, kk, k1, dense_limit=2048)
                u_w, _ = sp.top_left_subspace(m_w, kk, k2, dense_limit=2048)
                rec.update(full_rank=min(m_d.shape), overlap_with_w0=float(sp.subspace_overlap(u_d, u_w)),
                           near_zero_preference=near_zero_preference(w0, mv),
                           near_zero_preference_bfloat16=near_zero_preference(w0, mv_bf16),
                           singular_values=[float(v) for v in np.asarray(s[:64])])
                if s.shape[0] == min(m_d.shape):  # every singular value: rank and energy are defined
                    rec.update(numerical_rank=int(sp.numerical_rank(s, m_d.shape)),
                               effective_rank=float(sp.effective_rank(s)),
                               energy_top_k=float(sp.energy_fraction(s, kk)))
                if np.isfinite(rec["near_zero_preference"]):
                    nz.append(rec["near_zero_preference"])
                if np.isfinite(rec["near_zero_preference_bfloat16"]):
                    nz_bf16.append(rec["near_zero_preference_bfloat16"])
            per_matrix.append(rec)
    return {
        "sparsity": 1.0 - moved_total / max(total, 1),
        "sparsity_bfloat16": 1.0 - moved_bf16 / max(total, 1),
        "relative_movement_by_module": {m: float(np.sqrt(a / max(b, 1e-30))) for m, (a, b) in sorted(module.items())},
        "relative_movement_by_layer": {int(l): {m: float(np.sqrt(a / max(b, 1e-30))) for m, (a, b) in sorted(v.items())}
                                       for l, v in sorted(layer.items())},
        "near_zero_preference_mean": float(np.mean(nz)) if nz else float("nan"),
        "near_zero_preference_bfloat16_mean": float(np.mean(nz_bf16)) if nz_bf16 else float("nan"),
        "k": k,
        "matrices": per_matrix,
    }


def alignment_series(snapshots, *, k: int = 8, key=None) -> list[dict]:
    """For snapshots theta_0, ..., theta_T: overlap of the top-k subspace of (theta_t - theta_0) with
    that of (theta_T - theta_0), averaged over matrices, for every t (paper 001's early alignment)."""
    key = key if key is not None else jax.random.key(1)
    f0, fT = flatten_params(snapshots[0]), flatten_params(snapshots[-1])
    n_layers = f0["wq"].shape[0]
    out = []
    for t, snap in enumerate(snapshots[1:], 1):
        ft = flatten_params(snap)
        vals = []
        for name in f0:
            if f0[name].ndim < 2 or name in ("embed", "lm_head"):
                continue
            for li in range(n_layers):
                dt = as_matrix(name, jnp.asarray(ft[name][li], jnp.float32) - f0[name][li])
                dT = as_matrix(name, jnp.asarray(fT[name][li], jnp.float32) - f0[name][li])
                if dt is None or float(jnp.max(jnp.abs(dt))) == 0 or float(jnp.max(jnp.abs(dT))) == 0:
                    continue
                kk = min(k, *dt.shape)
                key, k1, k2 = jax.random.split(key, 3)
                vals.append(float(sp.subspace_overlap(sp.top_left_subspace(dt, kk, k1)[0],
                                                      sp.top_left_subspace(dT, kk, k2)[0])))
        out.append({"index": t, "alignment": float(np.mean(vals)) if vals else float("nan")})
    return out
