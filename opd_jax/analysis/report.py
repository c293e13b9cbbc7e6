"""`opd-jax analyze`: load snapshots, analyse the update, write analysis.json and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from opd_jax.analysis.updates import alignment_series, analyze_update
from opd_jax.errors import OpdError


def load_params(path: str | Path):
    """Parameters (pure dict) from a Hugging Face folder, a run folder (newest checkpoint) or a run's
    `checkpoints/<step>` folder."""
    from opd_jax.models import load_model
    from opd_jax.export import restore_run_params

    path = Path(path)
    if not path.exists():
        raise OpdError(f"snapshot path does not exist: {path}")
    if (path / "config.json").exists():
        return nnx.to_pure_dict(nnx.state(load_model(path)))
    if path.parent.name == "checkpoints" and path.name.isdigit():
        return _merged(*restore_run_params(path.parent.parent, int(path.name))[:2])
    return _merged(*restore_run_params(path)[:2])


def _merged(graphdef, params):
    """A run's parameters as the plain model they compute: LoRA adapters folded into their base weights
    (`lora.merged_params`), so an update is analysed as the change of W it makes."""
    from opd_jax.lora import merged_params

    return merged_params(params, nnx.merge(graphdef, params).cfg)


def run_series(run_dir: str | Path):
    """Every checkpoint of a run, oldest first: [(step, params)] (LoRA adapters merged)."""
    from opd_jax.export import restore_run_params

    steps = sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())
    return [(s, _merged(*restore_run_params(run_dir, s)[:2])) for s in steps]


def check_same_shapes(p0, p1, before, after):
    """One-line refusal of two snapshots that are not the same model (names or shapes differ)."""
    import jax

    a = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(p0)}
    b = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(p1)}
    if a.keys() != b.keys():
        diff = sorted(set(a) ^ set(b))
        raise OpdError(f"{before} and {after} are different models: {len(diff)} parameter(s) in only one of them, "
                       f"e.g. {diff[0]}")
    for name, shape in a.items():
        if b[name] != shape:
            raise OpdError(f"{before} and {after} are different models: {name} is {shape} in one and {b[name]} "
                           "in the other")


def analyze(before, after, out: str | Path, *, series: str | None = None, k: int = 8) -> dict:
    out = Path(out)
    p0, p1 = load_params(before), load_params(after)
    check_same_shapes(p0, p1, before, after)
    report = analyze_update(p0, p1, k=k)
    out.mkdir(parents=True, exist_ok=True)
    if series:
        snaps = run_series(series)
        report["alignment"] = [{"step": s, **a} for (s, _), a in
                               zip(snaps, alignment_series([p0] + [p for _, p in snaps], k=k))]
    (out / "analysis.json").write_text(json.dumps(report, indent=2))
    plot_report(report, out)
    return report


def plot_report(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    layers = report["relative_movement_by_layer"]
    modules = sorted({m for v in layers.values() for m in v})
    if layers:
        grid = np.array([[layers[l].get(m, np.nan) for m in modules] for l in sorted(layers, key=int)])
        fig, ax = plt.subplots(figsize=(1 + 0.8 * len(modules), 1 + 0.5 * len(layers)))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), [str(l) for l in sorted(layers, key=int)])
        ax.set_ylabel("layer")
        ax.set_title("relative movement ||dW|| / ||W0||")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(out / "movement_heatmap.png", dpi=100)
        plt.close(fig)
        written.append(out / "movement_heatmap.png")
    spectra = [m for m in report["matrices"] if m.get("singular_values")]
    if spectra:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in spectra:
            s = np.asarray(m["singular_values"])
            ax.semilogy(np.arange(1, len(s) + 1), s / s[0], alpha=0.5, lw=1)
        ax.set_xlabel("index")
        ax.set_ylabel("sigma_i / sigma_1 of dW")
        ax.set_title("singular value spectra of the update (one line per matrix)")
        fig.tight_layout()
        fig.savefig(out / "spectra.png", dpi=100)
        plt.close(fig)
        written.append(out / "spectra.png")
    if report.get("alignment"):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([a["step"] for a in report["alignment"]], [a["alignment"] for a in report["alignment"]], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel(f"top-{report['k']} subspace overlap with the final update")
        ax.set_ylim(0, 1.05)
        fig.tight_layout()
        fig.savefig(out / "alignment.png", dpi=100)
        plt.close(fig)
        written.append(out / "alignment.png")
    return written
