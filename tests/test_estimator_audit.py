"""The estimator audit (docs/math.md, "An audit of OPD estimators"): every one of our rows, and the
harness seeing each peer defect it was built to see. Expected gradients are exact (the sampled token
is enumerated), the exact gradients come from jax.grad of the claimed objective."""

import jax.numpy as jnp
import pytest

from opd_jax.analysis.estimator_audit import entries

ENTRIES = {e.name: e for e in entries()}
OURS = [n for n, e in ENTRIES.items() if e.source.startswith("ours")]
# rows that are approximations by design (documented), not estimates of the claimed objective
APPROX = {"teacher top-k + tail, forward KL (topk), against the full KL",
          "student top-k + tail, reverse KL, against the full KL",
          "the same, against the full proximal KL",
          "jsd(beta = 0.05) (full; documented: tends to 0, beta = 0 is forward KL)",
          "sampled forward KL, stop-gradient (documented biased)"}


def _audit(name, dtype, regime):
    from opd_jax.analysis.estimator_audit import audit

    return audit(ENTRIES[name], dtype, regime, n=8)


@pytest.mark.parametrize("name", OURS)
def test_our_rows(name):
    far = _audit(name, jnp.float32, "far")
    near16 = _audit(name, jnp.bfloat16, "near")
    assert far["nan"] == near16["nan"] == 0
    assert near16["negative"] == 0 and far["negative"] == 0  # a divergence never reports a negative value
    if name in APPROX:
        assert far["relative_bias"] > 0.05
        if "stop-gradient" in name:  # unbiased only for reverse KL: the audit must see it
            assert far["z"] > 6 and far["cosine"] < 0
        else:  # an approximation pointing the same way
            assert far["cosine"] > 0.8
    else:
        assert far["relative_bias"] < 1e-4 and far["cosine"] > 0.9999
        if ENTRIES[name].sampled:
            assert far["z"] < 1.0
        # bfloat16 logits: only their rounding moves the gradient (about 0.4%, against the float32 logits' gradient)
        assert _audit(name, jnp.bfloat16, "far")["relative_bias"] < 0.02


def test_the_harness_sees_each_peer_defect():
    miles = _audit("top-k reverse KL as a detached advantage penalty", jnp.float32, "far")
    assert miles["norm_ratio"] < 1e-4  # its expected gradient is 0 (float rounding only)
    verl = _audit("teacher top-k forward KL terms, clamp_min(0)", jnp.float32, "near")
    assert verl["zero_grad"] > 0  # the clamp drops every gradient of some contexts
    swift32 = _audit("JSD(0.5), teacher probabilities in the logits' precision", jnp.float32, "near")
    swift16 = _audit("JSD(0.5), teacher probabilities in the logits' precision", jnp.bfloat16, "near")
    assert swift32["negative"] == 0 and swift16["negative"] > 0 and swift16["min_value"] < -1e-5
    trl = _audit("0.5 CE(sample) + 0.5 JSD(0.5), both at T = 0.9", jnp.float32, "far")
    assert trl["relative_bias"] > 0.2
    beta = _audit("JSD(beta = 0.05) read as forward KL", jnp.float32, "far")
    assert beta["relative_bias"] > 0.9  # about 20 times too small a gradient
