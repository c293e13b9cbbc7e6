"""Causal grouped-query attention over cache slots: the plain reference and a blockwise (flash-style)
version that never forms the [T, S] score matrix.

Shapes: q [B, T, H, Dh]; k, v [B, S, K, Dh] (H % K == 0, G = H / K queries per key head);
q_slots [T] the cache slot of each query; key_valid [B, S] bool. Query t sees key s iff
s <= q_slots[t] and key_valid[b, s]:

    out_t = sum_s softmax_s(q_t . k_s / sqrt(Dh)) v_s        (over the visible s)

Blockwise: queries in blocks of `block_q`, keys in blocks of `block_k`; an online softmax keeps per
query the running max m, normaliser l and the weighted sum a, so memory is O(block_q * block_k) per
head instead of O(T * S). Key blocks that lie entirely after a query block's last slot are skipped
(`lax.cond`). The backward pass is a custom VJP that saves only the output and the log-sum-exp
and recomputes each block's probabilities P = exp(s - lse):

    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = dS K / sqrt(Dh),  dK = dS^T Q / sqrt(Dh)

A query with no visible key gets output 0 (the plain version averages over all slots there; both are
padding that no real token reads).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from opd_jax.blocks import pad_axis as _pad, split_blocks as _blocks

NEG_INF = -1e30  # finite, so a row with no visible key gives a uniform softmax instead of NaN
IMPLEMENTATIONS = ("auto", "blockwise", "naive", "splash")
AUTO_NAIVE_MAX = 256 * 256  # "auto" keeps the plain path while T * S is at most this (tiny shapes, decode steps)


def naive_attention(q, k, v, q_slots, key_valid, segments=None):
    """The reference: scores and softmax in float32 over all S slots. Returns [B, T, H, Dh].
    segments [B, S] int (packed rows, optional): query t also needs segments[t] == segments[s]."""
    b, t, h, dh = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(dh)
    visible = (jnp.arange(k.shape[1])[None, :] <= q_slots[:, None])[None] & key_valid[:, None, :]
    if segments is not None:
        visible = visible & (jnp.take(segments, q_slots, axis=1)[:, :, None] == segments[:, None, :])
    scores = jnp.where(visible[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


def _unblocks(x, axis):
    """Inverse of `_blocks` for a result with the block index leading and the block at `axis` + 1."""
    x = jnp.moveaxis(x, axis + 1, 1)
    x = x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
    return jnp.moveaxis(x, 0, axis)


def _scores(qb, kb, slots_q, slots_k, seg_q, seg_k, scale):
    """Masked float32 scores of one block pair: qb [B, bq, K, G, Dh], kb [B, bk, K, Dh], segment ids
    seg_q [B, bq], seg_k [B, bk] (0: a padded key) -> ([B, K, G, bq, bk], visible mask of that shape):
    causal, real keys, same segment."""
    s = jnp.einsum("btkgd,bskd->bkgts", qb, kb, preferred_element_type=jnp.float32) * scale
    vis = ((slots_k[None, :] <= slots_q[:, None])[None] & (seg_k[:, None, :] != 0)
           & (seg_q[:, :, None] == seg_k[:, None, :]))  # [B, bq, bk]
    vis = vis[:, None, None]
    return jnp.where(vis, s, NEG_INF), vis


def _tie(*xs):
    """The inputs tied together (`optimization_barrier`), so no part of the blockwise loops depends on
    the masks alone. Without it, a layer loop around this attention (lax.scan over layers, under
    grad) hoists the mask-only pieces (block visibility, skip predicates) out of the loops and keeps
    them for every (query block, key block) pair: [nq, nk, B, K, G, bq, bk] arrays, quadratic in the
    sequence (20 GiB per chip for the Qwen3-1.7B recipe at 4,096 new tokens)."""
    return jax.lax.optimization_barrier(xs)


def _forward(q, k, v, q_slots, seg_q, seg_k, bq, bk):
    """-> out [B, T, H, Dh] (q's dtype) and lse [nq, B, K, G, bq] float32 (per padded query block).
    seg_q [B, T], seg_k [B, S]: segment ids (0: padding key; see `_scores`)."""
    q, k, v, q_slots, seg_q, seg_k = _tie(q, k, v, q_slots, seg_q, seg_k)
    b, t, h, dh = q.shape
    kv = k.shape[2]
    g = h // kv
    scale = 1.0 / math.sqrt(dh)
    qb = _blocks(_pad(q.reshape(b, t, kv, g, dh), 1, bq), 1, bq)  # [nq, B, bq, K, G, Dh]
    slots_q = _blocks(_pad(q_slots, 0, bq, -1), 0, bq)  # padded queries see nothing
    segs_q = _blocks(_pad(seg_q, 1, bq), 1, bq)  # [nq, B, bq]
    kb, vb = (_blocks(_pad(x, 1, bk), 1, bk) for x in (k, v))  # [nk, B, bk, K, Dh]
    slots_k = _blocks(jnp.arange(kb.shape[0] * bk), 0, bk)
    segs_k = _blocks(_pad(seg_k, 1, bk), 1, bk)  # [nk, B, bk]; padded keys: segment 0

    def per_q_block(xs):
        qblk, sq, gq = xs
        init = (jnp.full((b, kv, g, bq), NEG_INF, jnp.float32), jnp.zeros((b, kv, g, bq), jnp.float32),
                jnp.zeros((b, kv, g, bq, dh), jnp.float32))

        def step(carry, ys):
            kblk, vblk, sk, vk = ys

            def compute(c):
                m, l, acc = c
                s, vis = _scores(qblk, kblk, sq, sk, gq, vk, scale)
                m_new = jnp.maximum(m, jnp.max(s, -1))
                p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(vblk.dtype), vblk,
                                                         preferred_element_type=jnp.float32)
                return m_new, l * corr + jnp.sum(p, -1), acc

            return jax.lax.cond(sk[0] > jnp.max(sq), lambda c: c, compute, carry), None

        (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, slots_k, segs_k))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)  # inf: P = 0 in the backward
        return out, lse

    out, lse = jax.lax.map(per_q_block, (qb, slots_q, segs_q))  # out [nq, B, K, G, bq, Dh]
    out = jnp.moveaxis(out, 4, 2)  # [nq, B, bq, K, G, Dh]
    out = _unblocks(out, 1)[:, :t].reshape(b, t, h, dh).astype(q.dtype)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, q_slots, seg_q, seg_k, bq, bk):
    return _forward(q, k, v, q_slots, seg_q, seg_k, bq, bk)[0]


def _flash_fwd(q, k, v, q_slots, seg_q, seg_k, bq, bk):
    out, lse = _forward(q, k, v, q_slots, seg_q, seg_k, bq, bk)
    return out, (q, k, v, q_slots, seg_q, seg_k, out, lse)


def _flash_bwd(bq, bk, res, d_out):
    q, k, v, q_slots, seg_q, seg_k, out, lse, d_out = _tie(*res, d_out)
    b, t, h, dh = q.shape
    s_len, kv = k.shape[1], k.shape[2]
    g = h // kv
    scale = 1.0 / math.sqrt(dh)
    grouped = lambda x: _blocks(_pad(x.reshape(b, t, kv, g, dh), 1, bq), 1, bq)  # noqa: E731
    qb, dob = grouped(q), grouped(d_out)
    # D_t = rowsum(dO * O), per query: [nq, B, K, G, bq]
    dd = jnp.moveaxis(jnp.sum(dob.astype(jnp.float32) * grouped(out).astype(jnp.float32), -1), 2, -1)
    slots_q = _blocks(_pad(q_slots, 0, bq, -1), 0, bq)
    segs_q = _blocks(_pad(seg_q, 1, bq), 1, bq)
    kb, vb = (_blocks(_pad(x, 1, bk), 1, bk) for x in (k, v))
    slots_k = _blocks(jnp.arange(kb.shape[0] * bk), 0, bk)
    segs_k = _blocks(_pad(seg_k, 1, bk), 1, bk)

    def per_k_block(dq_acc, ys):
        kblk, vblk, sk, vk = ys

        def per_q_block(carry, xs):
            dk, dv = carry
            qblk, doblk, sq, gq, lse_q, d_q = xs

            def compute(c):
                dk, dv = c
                s, vis = _scores(qblk, kblk, sq, sk, gq, vk, scale)
                p = jnp.where(vis, jnp.exp(s - lse_q[..., None]), 0.0)  # [B, K, G, bq, bk]
                dv = dv + jnp.einsum("bkgts,btkgd->bskd", p, doblk.astype(jnp.float32))
                dp = jnp.einsum("btkgd,bskd->bkgts", doblk.astype(jnp.float32), vblk.astype(jnp.float32))
                ds = p * (dp - d_q[..., None]) * scale
                dk = dk + jnp.einsum("bkgts,btkgd->bskd", ds, qblk.astype(jnp.float32))
                dq = jnp.einsum("bkgts,bskd->btkgd", ds, kblk.astype(jnp.float32))
                return (dk, dv), dq

            skip = sk[0] > jnp.max(sq)
            (dk, dv), dq = jax.lax.cond(skip, lambda c: (c, jnp.zeros(qblk.shape, jnp.float32)), compute, (dk, dv))
            return (dk, dv), dq

        zeros = jnp.zeros(kblk.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(per_q_block, (zeros, zeros), (qb, dob, slots_q, segs_q, lse, dd))
        return dq_acc + dq, (dk, dv)

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(per_k_block, dq0, (kb, vb, slots_k, segs_k))
    dq = _unblocks(dq, 1)[:, :t].reshape(b, t, h, dh).astype(q.dtype)
    dk = _unblocks(dk, 1)[:, :s_len].astype(k.dtype)
    dv = _unblocks(dv, 1)[:, :s_len].astype(v.dtype)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q, k, v, q_slots, key_valid, *, block_q: int = 512, block_k: int = 512, segments=None):
    """Flash-style attention (see the module docstring); same contract as `naive_attention`. Without
    segments every query is segment 1 and a key is segment key_valid (0 or 1)."""
    bq = max(1, min(block_q, q.shape[1]))
    bk = max(1, min(block_k, k.shape[1]))
    q_slots = jnp.asarray(q_slots, jnp.int32)
    if segments is None:
        seg_k = key_valid.astype(jnp.int32)
        seg_q = jnp.ones((q.shape[0], q.shape[1]), jnp.int32)
    else:
        seg_k = jnp.where(key_valid, segments, 0).astype(jnp.int32)
        seg_q = jnp.take(segments, q_slots, axis=1).astype(jnp.int32)
    return _flash(q, k, v, q_slots, seg_q, seg_k, bq, bk)


def _splash_kernel(t_pad: int, groups: int, block: int, interpret: bool):
    """A Pallas splash-attention MQA kernel for one kv head: causal over t_pad positions, `groups`
    query heads; blocks of the largest multiple of 128 among (block, 512, 256, 128) that divides t_pad."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    bs = next(c for c in (block, 512, 256, 128) if c % 128 == 0 and c <= t_pad and t_pad % c == 0)
    sizes = sk.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
                          block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)
    mask = sm.MultiHeadMask([sm.CausalMask((t_pad, t_pad)) for _ in range(groups)])
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret), sk.SegmentIds


def splash_attention(q, k, v, key_valid, *, block: int = 512, interpret: bool | None = None, segments=None):
    """Pallas splash attention (TPU kernel; `interpret` runs it in Pallas' interpreter elsewhere) for
    a whole sequence without a cache: query t sees key s iff s <= t and both are real (padding is a
    separate segment, so a real query never sees a padded key). q [B, T, H, Dh], k, v [B, T, K, Dh],
    key_valid [B, T] -> [B, T, H, Dh]. T is padded to a multiple of 128; each kv head runs the MQA
    kernel over its G query heads, with q scaled by 1/sqrt(Dh) (the kernel does not scale)."""
    b, t, h, dh = q.shape
    kv = k.shape[2]
    g = h // kv
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    t_pad = -(-t // 128) * 128
    kernel, segment_ids = _splash_kernel(t_pad, g, block, interpret)
    pad = lambda x: _pad(x, 1, t_pad)  # noqa: E731
    # padded tail: segment 0, like left padding; packed rows: their segment ids (0 where padded)
    seg = pad(key_valid.astype(jnp.int32) if segments is None else jnp.where(key_valid, segments, 0).astype(jnp.int32))
    qg = pad(q * jnp.asarray(1.0 / math.sqrt(dh), q.dtype)).reshape(b, t_pad, kv, g, dh).transpose(0, 2, 3, 1, 4)
    kg, vg = (pad(x).transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, T, Dh]

    def one_row(qr, kr, vr, sr):  # qr [K, G, T, Dh], kr / vr [K, T, Dh], sr [T]
        ids = segment_ids(q=sr, kv=sr)
        return jax.vmap(lambda a, c, d: kernel(a, c, d, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(one_row)(qg, kg, vg, seg)  # [B, K, G, T, Dh]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t_pad, h, dh)[:, :t].astype(q.dtype)


def _on_mesh(fn, layout, *xs):
    """Run a per-device kernel `fn` on a mesh: shard_map over the batch mesh axes (rows split, heads
    and sequence whole on each device), since a Pallas call is not partitioned automatically."""
    specs = tuple(layout.spec(("batch",) + (None,) * (x.ndim - 1), x.shape) for x in xs)
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*xs)


def resolve(impl: str, t: int, s: int, *, cached: bool = False, head_dim: int = 128) -> str:
    """The implementation to run for a [T, S] attention. "auto": the plain path for small T * S
    (decode steps, tiny models); on TPU, splash for a whole sequence without a cache when Dh is a
    multiple of 128; otherwise blockwise. "splash" needs a whole sequence without a cache (training,
    teacher scoring); with a cache (prefill, decode) it falls back to blockwise."""
    if impl not in IMPLEMENTATIONS:
        from opd_jax.errors import OpdError
        raise OpdError(f"attention must be one of {IMPLEMENTATIONS}, got {impl!r}")
    whole = not cached and t == s
    if impl == "auto":
        if t * s <= AUTO_NAIVE_MAX or t == 1:
            return "naive"
        return "splash" if whole and head_dim % 128 == 0 and jax.default_backend() == "tpu" else "blockwise"
    if impl == "splash":
        return "splash" if whole else "blockwise"
    return impl


def cache_buckets(s: int, smallest: int = 128, most: int = 16) -> tuple[int, ...]:
    """The static key lengths a decode step may read from a cache of s slots: multiples of a step
    (`smallest` doubled until at most `most` steps cover s), then s itself. A step reads at most one
    step's worth of empty slots."""
    step = smallest
    while step * most < s:
        step *= 2
    return tuple(range(step, s, step)) + (s,)


def from_cache(x, dtype):
    """Cache entries as `dtype`: a 16-bit float cache is stored as its uint16 bit pattern
    (`transformer.cache_dtype`), so it is bit-cast back; otherwise converted."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return jax.lax.bitcast_convert_type(x, dtype)
    return x.astype(dtype)


def to_cache(x, cache_dtype):
    """The inverse of `from_cache`: values of x (in the compute dtype) as stored in the cache."""
    if jnp.issubdtype(cache_dtype, jnp.integer):
        return jax.lax.bitcast_convert_type(x, cache_dtype)
    return x.astype(cache_dtype)


def decode_attention(q, cache_k, cache_v, layer, q_slots, key_valid):
    """Attention of new queries over the filled part of a KV cache only, so a decode step costs what
    the cache holds, not its capacity: the shortest length in `cache_buckets(S)` that covers slot
    q_slots[-1] is chosen on device (`lax.switch` over static lengths) and the plain path runs over
    those slots; later slots are invisible to these queries anyway, so the result is the plain path's.
    q [B, T, H, Dh]; cache_k / cache_v [B, L, S, K, Dh] (this call reads layer `layer`); q_slots [T];
    key_valid [B, S]. -> [B, T, H, Dh]."""
    b, _, s, kv, dh = cache_k.shape
    sizes = cache_buckets(s)

    def over(n):
        def run(q, cache_k, cache_v, key_valid):
            k, v = (from_cache(jax.lax.dynamic_slice(c, (0, layer, 0, 0, 0), (b, 1, n, kv, dh))[:, 0], q.dtype)
                    for c in (cache_k, cache_v))
            return naive_attention(q, k, v, q_slots, key_valid[:, :n])
        return run

    if len(sizes) == 1:
        return over(s)(q, cache_k, cache_v, key_valid)
    which = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), q_slots[-1] + 1)  # first length >= filled slots
    return jax.lax.switch(which, [over(n) for n in sizes], q, cache_k, cache_v, key_valid)


def attention(q, k, v, q_slots, key_valid, impl: str = "naive", block: int = 512, *, cached: bool = False,
              layout=None, segments=None):
    """Dispatch to the implementation `resolve` names. `cached`: keys come from a KV cache (slots
    beyond this call's queries). `layout` (the step's `sharding.layout_fn`, optional): on a mesh, the
    splash kernel runs under shard_map over the batch axes. segments [B, S] int (packed rows, whole
    sequences only): a query sees only keys of its own segment."""
    which = resolve(impl, q.shape[1], k.shape[1], cached=cached, head_dim=q.shape[-1])
    if which == "naive":
        return naive_attention(q, k, v, q_slots, key_valid, segments)
    if which == "splash":
        if segments is None:
            fn = functools.partial(splash_attention, block=block)
            return fn(q, k, v, key_valid) if layout is None else _on_mesh(fn, layout, q, k, v, key_valid)
        fn = lambda q, k, v, kv, sg: splash_attention(q, k, v, kv, block=block, segments=sg)  # noqa: E731
        return fn(q, k, v, key_valid, segments) if layout is None else _on_mesh(fn, layout, q, k, v, key_valid,
                                                                                segments)
    return blockwise_attention(q, k, v, q_slots, key_valid, block_q=block, block_k=block, segments=segments)
