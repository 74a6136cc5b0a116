"""What the train loop does between steps, one small hook each: preemption, the metrics log, the skipped-step
limit, evaluation, sample grids, checkpoints and a profiler trace.

A hook is called after every step with a `Tick` (steps done, the state, whether this is the run's last step) and
decides itself whether it is due. Every host calls every hook at every step: those that are collectives (the
preemption vote, data counts, checkpoints, evaluation) run on all hosts at the same steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax

from genllava_jax import errors
from genllava_jax.preemption import Preemption


@dataclasses.dataclass
class Tick:
    step: int  # steps done: the step that just finished, counted from 1
    state: Any  # the train state after it
    end: bool  # the last step of this call (train.steps, or the caller's stop_after)
    stop: bool = False  # preempted: the run stops after this step (set by the Preempt hook)

    @property
    def last(self) -> bool:
        return self.end or self.stop


class Hook:
    def begin(self, step: int) -> None:
        """Before the first step of this call (`step` steps done so far)."""

    def __call__(self, t: Tick) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """After the loop, also after an error."""


class Every(Hook):
    """fn(tick) every `every` steps (0: never)."""

    def __init__(self, every: int, fn: Callable[[Tick], None]):
        self.every, self.fn = every, fn

    def __call__(self, t: Tick) -> None:
        if self.every and t.step % self.every == 0:
            self.fn(t)


class Preempt(Hook):
    """A SIGTERM stops the run after the current step, on every host at the same step (`preemption`)."""

    def __init__(self):
        self.preemption = Preemption()

    def begin(self, step: int) -> None:
        self.preemption.__enter__()

    def __call__(self, t: Tick) -> None:
        t.stop = self.preemption(t.step)  # a collective on several hosts: asked after every step

    def close(self) -> None:
        self.preemption.__exit__()


class Log(Hook):
    """Every `every` steps and at the last one: the window's metrics (`metrics.Accumulator`), `extra()` (data
    counts, ...), model FLOPs and MFU, to the writer; `rows[-1]` is the newest row."""

    def __init__(self, every: int, acc, writer, extra: Callable[[Tick], dict], step_flops: float, peak: float | None):
        self.every, self.acc, self.writer, self.extra = every, acc, writer, extra
        self.step_flops, self.peak, self.rows = step_flops, peak, [{}]

    def __call__(self, t: Tick) -> None:
        if t.step % self.every and not t.last:
            return
        row = self.acc.flush()
        row.update(self.extra(t), model_flops_per_step=self.step_flops)
        step_time = row.get("step_time_p50")
        if self.peak and step_time:  # model FLOPs over what the devices could do in the median step time
            row["mfu"] = self.step_flops / (step_time * self.peak)
        self.rows.append(self.writer.write(t.step, row))


class SkipLimit(Hook):
    """Stops the run when more than `limit` steps (counted in the state, across restarts) had a non-finite loss or
    gradient; checked with the log."""

    def __init__(self, limit: int, every: int, newest_checkpoint: Callable[[], int | None]):
        self.limit, self.every, self.newest = limit, every, newest_checkpoint

    def __call__(self, t: Tick) -> None:
        if t.step % self.every and not t.last:
            return
        skipped = int(t.state["skipped"])
        if skipped > self.limit:
            raise errors.Diverged(
                f"{skipped} steps had a non-finite loss or gradient (limit train.max_skipped_steps={self.limit}); "
                f"stopping at step {t.step}. Parameters were never updated with non-finite values; the newest "
                f"checkpoint is step {self.newest()}. Lower train.lr, check the data, or raise the limit.")


class Checkpoint(Hook):
    """`save(step, state, force)` every step (the checkpoint manager keeps its own interval); forced at the final
    step and when preempted, not when a call merely ends early (`stop_after`)."""

    def __init__(self, save: Callable[..., Any], final_step: int):
        self.save, self.final_step = save, final_step

    def __call__(self, t: Tick) -> None:
        self.save(t.step, t.state, force=t.step == self.final_step or t.stop)


class Profile(Hook):
    """A `jax.profiler` trace of steps first..last (counted from 1) into `logdir` (TensorBoard's profile plugin or
    XProf read it)."""

    def __init__(self, steps, logdir: Path, log: Callable[[str], None]):
        self.first, self.last = tuple(steps) if steps else (0, -1)
        self.logdir, self.log, self.running = Path(logdir), log, False

    def _start(self) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(self.logdir))
        self.running = True

    def begin(self, step: int) -> None:
        if step == self.first - 1:
            self._start()

    def __call__(self, t: Tick) -> None:
        if t.step == self.first - 1 and not t.last:
            self._start()
        elif self.running and (t.step == self.last or t.last):
            jax.block_until_ready(t.state)
            self.close()
            self.log(f"profile of steps {self.first}..{t.step}: {self.logdir}")

    def close(self) -> None:
        if self.running:
            jax.profiler.stop_trace()
            self.running = False
