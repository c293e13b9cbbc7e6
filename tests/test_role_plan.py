"""`opd_jax.role_plan`: teachers planned on devices of their own, against a hand count of their weights,
and the role layout a refusal proposes when co-located teachers do not fit."""

from opd_jax.plan import GiB, plan

from test_plan import _cfg, qwen3_8b_counts


def test_roles_are_planned_on_their_own_devices(tmp_path):
    """Learner on devices 0-3, a teacher (the Qwen3-8B-shaped student's own snapshot) on 4-7: the
    learner's figures are those of a 4-device mesh and the teacher's weights are split 4 ways on its
    devices, not 8 (hand count: every matrix divides by 4, the norms are whole on each device); the
    total is the fuller side."""
    p = plan(_cfg(**{"mesh.roles": "{learner: 0-3, big: 4-7}", "data.max_new_tokens": 4, "data.max_prompt_len": 4,
                     "student.init.num_layers": 2}), n_devices=8, compile=True)
    assert p.mesh == {"data": 1, "fsdp": 4, "tensor": 1} and p.devices_total == 8
    t = p.roles["big"]
    assert t["devices"] == 4 and p.teacher_bytes_per_device == 0  # not on the learner's devices
    total, _ = qwen3_8b_counts()
    per_layer = (total - 2 * 151936 * 4096 - 4096) // 36
    norms = 2 * (2 * 4096 + 2 * 128) + 4096
    assert t["weight_bytes_per_device"] == (2 * 151936 * 4096 + 2 * per_layer + 4096 - norms) * 2 / 4 + norms * 2
    assert t["forward_temp_bytes_per_device"] > 0
    assert p.total_bytes_per_device == max(p.update_phase_bytes_per_device, p.rollout_phase_bytes_per_device,
                                              t["weight_bytes_per_device"] + t["forward_temp_bytes_per_device"])


def test_a_teacher_that_does_not_fit_beside_the_student_gets_a_role_layout(tmp_path):
    """Co-located, the 8B-shaped teacher needs more than a 2 GiB device: the refusal names the mesh.roles
    that gives it devices of its own."""
    from opd_jax.plan import refusal

    cfg = _cfg(**{"data.max_new_tokens": 4, "data.max_prompt_len": 4, "mesh.device_memory_gb": 2})
    p = plan(cfg, n_devices=8)
    msg = refusal(p, 2 * GiB, cfg)
    assert "\n" not in msg
    # teacher total 16.4 GB: 60% of 2 GiB per device -> 16 devices of its own
    assert msg.endswith("or give the teachers devices of their own: mesh.roles {learner: 0-7, big: 8-23} "
                        "(plan it with opd-jax plan --devices 24)")
