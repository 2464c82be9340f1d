"""Accepted prompts reach the write-ahead queue in batches: one INSERT per pass of the event loop.

Each SQLite statement gives up the GIL; a busy worker thread then keeps it for up to a switch interval (5 ms). One
write per prompt from ComfyUI's ``POST /prompt`` handler cost 15-25% of the accepted prompts per second. A writer
thread that the handler waits for keeps the loop from waiting for the GIL, but waking the thread and then the loop
for every batch costs CPU: measured against this module on the shared 2-core VM (20 rounds while no other process
ran, both without a lock around statements), it accepted about as many prompts (-7% against -9% of the no-store
rate of the same round) for 40% more server CPU per prompt (2.7 against 1.9 ms), and fell further behind whenever
other processes wanted the CPU. So accepted prompts are written on the event loop, one statement per loop pass:
the handler adds the prompt to the batch and the HTTP answer awaits the batch's commit
(``MultiDeviceServer._handle``), which runs once the handlers of that pass have all added theirs. Only then is the
prompt queued for its worker, so no worker ever starts a prompt the store does not have. A ``put`` from another
thread (a custom node) is written by this module's thread instead.

History entries are not written here: a worker writes its prompt's entry itself, right after the prompt ends (and
its start before it runs), so only prompts that were really running at a crash run again after it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

from .journal import MAX_ROWS_PER_STATEMENT

if TYPE_CHECKING:
    from .journal import Journal

log = logging.getLogger("comfy_parallel")

Place = Callable[[bool], None]  # queues a stored prompt (True), or lets go of one that could not be stored (False)


class JournalWriter:
    """The loop's batch, and the thread for prompts put from other threads."""

    def __init__(self, journal: "Journal", loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.journal = journal
        self.loop = loop
        self.loop_batch: list[tuple[str, tuple, Place, asyncio.Future]] = []
        self.cond = threading.Condition()
        self.pending: list[tuple[str, tuple, Place, Future]] = []  # from other threads than the loop's
        self.busy = False
        self.thread = threading.Thread(target=self._run, name="comfy-parallel-journal", daemon=True)
        self.thread.start()

    def accept(self, route: str, item: tuple, place: Place) -> "Future | asyncio.Future":
        """Store ``item`` with ``route``, then ``place`` it (queue or pool it); the future is done once both
        happened (or failed: then ``place(False)``)."""
        if self.loop is not None and _running_loop() is self.loop:
            loop_future: asyncio.Future = self.loop.create_future()
            if not self.loop_batch:
                self.loop.call_soon(self._commit_loop_batch)
            self.loop_batch.append((route, item, place, loop_future))
            return loop_future
        future: Future = Future()
        with self.cond:
            self.pending.append((route, item, place, future))
            self.cond.notify_all()
        return future

    def _commit_loop_batch(self) -> None:
        batch, self.loop_batch = self.loop_batch, []
        self._accept(batch)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the thread has written what it was handed (before a clean exit); False if that took too long."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.pending and not self.busy, timeout)

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.pending))
                batch, self.pending = self.pending, []
                self.busy = True
            try:
                self._accept(batch)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def _accept(self, batch: list[tuple[str, tuple, Place, Any]]) -> None:
        for start in range(0, len(batch), MAX_ROWS_PER_STATEMENT):
            self._accept_statement(batch[start:start + MAX_ROWS_PER_STATEMENT])

    def _accept_statement(self, run: list[tuple[str, tuple, Place, Any]]) -> None:
        try:
            self.journal.accepted_many([(route, item) for route, item, _, _ in run])
        except Exception as err:  # not stored, so not queued: each client gets an error instead of an id
            log.error("comfy-parallel: %d prompts could not be written to %s (%s: %s); they are not queued",
                      len(run), self.journal.path, type(err).__name__, err)
            for _, _, place, future in run:
                place(False)
                if not future.done():  # done: its request was cancelled
                    future.set_exception(err)
            return
        for _, _, place, future in run:
            place(True)
            if not future.done():
                future.set_result(None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
