"""Run directories and metrics: console progress, JSONL, wandb (offline by default), plots.

A run directory holds::

    config.yaml        the resolved configuration
    metrics.jsonl      one JSON object per logged step (``stage``, ``step``, metrics)
    plots/*.png        one figure per metric family
    checkpoints/       resumable checkpoints (see checkpoint.py)
    final/             HF-format exports
    summary.json/.md   the figures a person reads first
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config, TrackingConfig, dump_config


def new_run_dir(cfg: Config, command: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.tracking.root) / f"{cfg.name}-{command}-{stamp}"
    d, i = base, 1
    while d.exists():
        d = Path(f"{base}-{i}")
        i += 1
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(dump_config(cfg))
    return d


class Tracker:
    def __init__(self, run_dir: Path, cfg: TrackingConfig, config: dict | None = None,
                 name: str = "run"):
        self.dir = Path(run_dir)
        self.cfg = cfg
        (self.dir / "plots").mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self._fh = self.metrics_path.open("a")
        self._wandb = None
        if cfg.wandb != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self._wandb = wandb.init(project=cfg.project, name=name, dir=str(self.dir),
                                         mode=cfg.wandb, config=config or {}, reinit="finish_previous")
            except Exception as exc:  # tracking must never take a run down
                print(f"[rayalign] wandb disabled: {exc}", file=sys.stderr)

    def log(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
        row = {"stage": stage, "step": step, "time": time.time(), **metrics}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in metrics.items()
                             if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: Path, stage: str | None = None) -> list[dict]:
    """The rows of ``stage`` (all stages: None). A later row for the same stage and step
    replaces the earlier one: a resumed or recovered run ran that step again from its
    checkpoint, and the later row is the one the run's state continues from."""
    rows: dict[tuple, dict] = {}
    if not Path(path).is_file():
        return []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if stage is None or r.get("stage") == stage:
                rows[(r.get("stage"), r.get("step"))] = r
    return list(rows.values())


def plot_metrics(run_dir: Path, stage: str, keys: list[list[str]], title: str | None = None) -> Path | None:
    """One PNG per stage: a panel per group of keys, metric against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / "metrics.jsonl", stage)
    groups = [[k for k in g if any(k in r for r in rows)] for g in keys]
    groups = [g for g in groups if g]
    if not rows or not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for k in group:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))
                   and math.isfinite(r[k])]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=k)
        ax.set_xlabel("step")
        ax.set_title(", ".join(group))
        ax.grid(alpha=0.3)
        if len(group) > 1:
            ax.legend()
    fig.suptitle(title or stage)
    fig.tight_layout()
    out = Path(run_dir) / "plots" / f"{stage}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_summary(run_dir: Path, summary: dict[str, Any], title: str) -> None:
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(summary)
    path.write_text(json.dumps(old, indent=1, default=str))
    lines = [f"# {title}", "", "| key | value |", "|---|---|"]
    for k, v in old.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        lines.append(f"| {k} | {v} |")
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")


class Progress:
    """A tqdm bar on stderr with live metrics; quiet under CI log capture too."""

    def __init__(self, total: int, desc: str, initial: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0)

    def update(self, n: int = 1, **metrics) -> None:
        if metrics:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()},
                                 refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
