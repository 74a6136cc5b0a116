"""A bounded request queue whose worker thread runs requests in batches: those that arrive together (within
`wait_s` of the first) and share a key (settings that one jitted call must share) go through one call.

Each request has its own event queue: the batch function puts streamed pieces on it, then the result or an error.
Past `max_pending` waiting requests, `submit` raises Busy at once instead of queueing without bound.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
import traceback
from typing import Any, Callable, Hashable


class Busy(Exception):
    """The queue is full; the caller should answer "busy" and let the user retry."""


@dataclasses.dataclass(eq=False)
class Request:
    key: Hashable
    payload: Any
    events: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)

    def put(self, kind: str, value=None):
        """kind: "text" (a streamed piece), "done" (the result) or "error" (a message for the user)."""
        self.events.put((kind, value))

    def results(self, timeout: float | None = None):
        """The request's events until "done" or "error" (included)."""
        while True:
            kind, value = self.events.get(timeout=timeout)
            yield kind, value
            if kind in ("done", "error"):
                return


class Batcher:
    def __init__(self, run: Callable[[list[Request]], None], *, max_batch: int = 4, wait_s: float = 0.01,
                 max_pending: int = 16):
        """`run(batch)` answers every request of a batch (put "done" or "error" on each); one that raises gets
        its exception as an "error" on every request of the batch, and the worker goes on."""
        self.run, self.max_batch, self.wait_s, self.max_pending = run, max_batch, wait_s, max_pending
        self._pending: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches: list[tuple] = []  # (key, size) of every batch run, in order
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, payload) -> Request:
        req = Request(key, payload)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._pending) >= self.max_pending:
                raise Busy(f"{len(self._pending)} requests are waiting (the limit is {self.max_pending})")
            self._pending.append(req)
            self._cond.notify_all()
        return req

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _next_batch(self) -> list[Request] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key = self._pending[0].key
            deadline = time.monotonic() + self.wait_s
            # wait for the batch to fill, but never longer than wait_s after the first request was taken up
            while sum(r.key == key for r in self._pending) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            batch = [r for r in self._pending if r.key == key][:self.max_batch]
            for r in batch:
                self._pending.remove(r)
            return batch

    def _loop(self):
        while (batch := self._next_batch()) is not None:
            self.batches.append((batch[0].key, len(batch)))
            try:
                self.run(batch)
            except Exception as e:  # a failed batch must not stop the server: its requests get the error
                traceback.print_exc()
                for r in batch:  # (one already answered has stopped reading)
                    r.put("error", f"internal error: {type(e).__name__}: {e}")
