"""Metrics to stdout, `<workdir>/metrics.jsonl` (one JSON object per logged step) and TensorBoard (process 0 only),
and the accumulator of a logging window's step metrics and step times."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from genllava_jax.atomic import cut_torn_line

COUNTS = ("tokens", "images", "skipped")  # per-step counts: summed into rates, never averaged


class Accumulator:
    """Step metrics of one logging window, summed on device as the steps run; averaged when flushed.

    Step times: the host waits for step k only after it dispatched step k+1 (one step stays queued, the devices never
    idle for it), and a step's time is the gap between two steps becoming ready; the first step (the compile) has none.
    """

    def __init__(self):
        self.sum, self.count, self.times = None, 0, []
        self._pending = self._ready = None
        self._since = time.time()

    def add(self, metrics: dict) -> None:
        self.sum = metrics if self.sum is None else jax.tree.map(jnp.add, self.sum, metrics)
        self.count += 1
        self._wait()
        self._pending = metrics["loss"]

    def _wait(self) -> None:
        if self._pending is not None:
            jax.block_until_ready(self._pending)
            now = time.perf_counter()
            if self._ready is not None:
                self.times.append(now - self._ready)
            self._pending, self._ready = None, now

    def flush(self) -> dict:
        """The window's means, token and image rates and step-time percentiles (s); starts a new window."""
        self._wait()
        host, dt = jax.device_get(self.sum), time.time() - self._since
        out = {k: float(v) / self.count for k, v in host.items() if k not in COUNTS}
        out.update(tokens_per_s=float(host["tokens"]) / dt, images_per_s=float(host["images"]) / dt)
        if self.times:
            p50, p90 = np.percentile(self.times, [50, 90])
            out.update(step_time_p50=float(p50), step_time_p90=float(p90), step_time_max=max(self.times))
        self.sum, self.count, self.times, self._since = None, 0, [], time.time()
        return out


class MetricWriter:
    def __init__(self, workdir, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            cut_torn_line(self.path)  # a run killed mid-write: the resumed one appends whole rows after it
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
