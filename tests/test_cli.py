"""The command line: flags reach the config."""


def test_train_cli_multihost_flags_fill_the_distributed_section(monkeypatch):
    import opd_jax.train
    from opd_jax.cli import main

    seen = {}
    monkeypatch.setattr(opd_jax.train, "train", lambda cfg, **kw: seen.setdefault("cfg", cfg) and {})
    assert main(["train", "--coordinator", "10.0.0.2:1234", "--num-processes", "4", "--process-id", "3",
                 "train.steps=5"]) == 0
    d = seen["cfg"].distributed
    assert (d.coordinator, d.num_processes, d.process_id, seen["cfg"].train.steps) == ("10.0.0.2:1234", 4, 3, 5)
