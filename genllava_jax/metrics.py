"""Metrics to stdout, `<workdir>/metrics.jsonl` (one JSON object per logged step) and TensorBoard; process 0 only."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, metrics: dict, prefix: str = "") -> dict:
        row = {"step": int(step), **{prefix + k: _scalar(v) for k, v in metrics.items()}}
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.tb.add_scalar(k, v, step)
                self.tb.flush()
            print(" ".join(f"{k} {_fmt(v)}" for k, v in row.items()), flush=True)
        return row

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
