"""Preemption: a SIGTERM asks the training loop to stop at the next step boundary, and every host stops there.

    with Preemption() as preempted:
        for step in ...:
            ...one step...
            if preempted(step):  # called by every host after every step
                save a checkpoint; exit cleanly

One process: our SIGTERM handler sets a flag (a second SIGTERM gets the previous handler, so it can still kill).
Several processes (`jax.distributed.initialize`): JAX's preemption service already catches SIGTERM on each host
and agrees on a step at which all of them stop (`multihost_utils.reached_preemption_sync_point`); with that
service disabled, each host's flag is all-gathered every step and any host's SIGTERM stops them all.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preemption:
    def __init__(self):
        self.requested = False
        self._previous = None
        self._native = jax.process_count() > 1 and jax.config.jax_enable_preemption_service

    def __enter__(self) -> "Preemption":
        # Our handler would replace the preemption service's; signals can only be handled on the main thread.
        if not self._native and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle) or signal.SIG_DFL  # None: set from C
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, self._previous)  # a second SIGTERM is not asked twice
        self._previous = None

    def __call__(self, step: int) -> bool:
        """Whether to stop after `step`; the same answer on every host (a collective: every host calls it)."""
        if self._native:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        if jax.process_count() > 1:
            return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())
        return self.requested
