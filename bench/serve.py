"""The web demo's batching: 8 turns arriving together (4 chats about images, 2 generations, 2 edits) served in
batches of 4 vs the same turns one at a time (batch 1, each waiting for the last: a server without batching),
on the demo model (`make demo` first). Same Assistant, same settings; compiles are excluded (each worker is
warmed up first, timed separately).

    .venv/bin/python bench/serve.py [--workdir=runs/demo/train]   # prints a Markdown row, stores it in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench_util import ROOT, record
from genllava_jax import infer
from genllava_jax.cli import load_assistant, open_image
from genllava_jax.serve.worker import Turn, Worker


def serve(worker: Worker, turns: list[Turn], together: bool) -> float:
    """Seconds to answer every turn: all submitted at once, or each after the last one's answer."""
    t0, last = time.perf_counter(), []
    if together:
        reqs = [worker.submit(t) for t in turns]
        last = [list(r.results())[-1][0] for r in reqs]
    else:
        last = [list(worker.submit(t).results())[-1][0] for t in turns]
    assert last == ["done"] * len(turns), last
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default=str(ROOT / "runs/demo/train"))
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    assistant, c = load_assistant(a.workdir)
    settings = infer.Settings(max_new_tokens=12)  # make serve's
    images = sorted((Path(c.data.path).parent / "images").glob("*.png"))[:4]  # paths in the run are from the root
    pics = [open_image(str(p)) for p in images]
    turns = ([Turn("chat", "What colour is the shape?", im, settings=settings) for im in pics]
             + [Turn("generate", f"Draw a {c} circle.", settings=settings) for c in ("red", "blue")]
             + [Turn("edit", "Make it larger.", pics[i], settings=settings) for i in (0, 1)])
    workers = {b: Worker(assistant, context=c.data.max_len, defaults=settings, batch_size=b) for b in (1, 4)}
    warm = {b: w.warm_up(log=lambda s: None) for b, w in workers.items()}
    one = min(serve(workers[1], turns, together=False) for _ in range(a.repeats))
    batched = min(serve(workers[4], turns, together=True) for _ in range(a.repeats))
    calls = [n for _, n in workers[4].batcher.batches[-2:]]
    record("serve", "python bench/serve.py", ["turns", "one at a time (s)", "batched by 4 (s)", "speed-up",
                                              "warm-up batch 1 / 4 (s)"],
           [f"{len(turns)}", f"{one:.2f}", f"{batched:.2f}", f"{one / batched:.2f}x", f"{warm[1]:.0f} / {warm[4]:.0f}"],
           note=f"Demo model (runs/demo/train), max_new_tokens 12, 25 DDIM steps, guidance 3; the batched run's last "
                f"two calls took {calls} turns; best of {a.repeats}; {os.cpu_count()} CPU cores.")


if __name__ == "__main__":
    main()
