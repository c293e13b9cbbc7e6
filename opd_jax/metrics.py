"""Run metrics: JSONL (source of truth), TensorBoard event files, PNG plots. Only process 0 writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax


def _is_main() -> bool:
    return jax.process_index() == 0


def _reset_jsonl(path: Path, resume_step: int | None):
    """Start a step-keyed JSONL log: empty for a new run; on resume keep only records up to resume_step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is None:
        path.write_text("")
    elif path.exists():
        from opd_jax.run_folder import repair_jsonl
        repair_jsonl(path)
        kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))


class SamplesWriter:
    """samples.jsonl: one line per sample at every eval ({"step", "source", "domain", "prompt",
    "completion", "answer", "reward", "divergence"}); on resume, lines after `resume_step` are dropped."""

    def __init__(self, out_dir: str | Path, resume_step: int | None = None):
        self.path = Path(out_dir) / "samples.jsonl"
        if _is_main():
            _reset_jsonl(self.path, resume_step)

    def write(self, step: int, rows: list[dict]):
        if _is_main():
            with self.path.open("a") as f:
                f.writelines(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n" for r in rows)


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    On resume, records after `resume_step` are dropped first, so a restarted run leaves one record
    per step.
    """

    def __init__(self, out_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.out = Path(out_dir)
        self.path = self.out / "metrics.jsonl"
        self.tb = None
        if not _is_main():
            return
        _reset_jsonl(self.path, resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, record: dict):
        if not _is_main():
            return
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_metrics(metrics_path: str | Path, out_dir: str | Path, keys=None) -> list[Path]:
    """One PNG per metric family (loss, divergence, accuracy, ...) from metrics.jsonl."""
    if not _is_main():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = {"loss": lambda k: k.endswith("loss"), "divergence": lambda k: "divergence" in k,
              "accuracy": lambda k: k.startswith("eval/") and "accuracy" in k,
              "agreement": lambda k: "agreement" in k, "mismatch": lambda k: "mismatch" in k}
    if keys:
        groups = {k: v for k, v in groups.items() if k in keys}
    written = []
    for name, match in groups.items():
        series = {}
        for r in recs:
            for k, v in r.items():
                if k != "step" and match(k) and isinstance(v, (int, float)):
                    series.setdefault(k, ([], []))
                    series[k][0].append(r["step"])
                    series[k][1].append(v)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, label=k, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
