"""Accepted prompts reach the write-ahead queue in batches, written by one thread off the event loop.

Writing each prompt from ComfyUI's ``POST /prompt`` handler itself made the event loop give up the GIL for every
SQLite call; a busy worker thread then kept it for up to a switch interval, and the server accepted 15% fewer
prompts per second (bench/crash_safe_queue.py). Here the handler hands the prompt to the writer thread, and the
HTTP answer waits (asynchronously, ``MultiDeviceServer._handle``) until the batch holding it is committed. Only then
is the prompt queued for its worker, so no worker ever starts a prompt the store does not have. Prompts that arrive
while a batch is being written form the next batch: one commit for many prompts under load.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .journal import Journal
    from .queues import DeviceQueue

log = logging.getLogger("comfy_parallel")


class Intake:
    """The writer thread and its pending prompts; ``submit`` may be called from any thread."""

    def __init__(self, journal: "Journal") -> None:
        self.journal = journal
        self.cond = threading.Condition()
        self.pending: list[tuple["DeviceQueue", tuple, Future]] = []
        self.thread = threading.Thread(target=self._run, name="comfy-parallel-intake", daemon=True)
        self.thread.start()

    def submit(self, queue: "DeviceQueue", item: tuple) -> Future:
        """Store ``item`` and then queue it on ``queue``; the future is done once both happened (or failed)."""
        future: Future = Future()
        with self.cond:
            self.pending.append((queue, item, future))
            self.cond.notify()
        return future

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending:
                    self.cond.wait()
                batch, self.pending = self.pending, []
            try:
                self.journal.accepted_many([(q.index, item) for q, item, _ in batch])
            except Exception as err:  # not stored, so not queued: each client gets an error instead of an id
                log.error("comfy-parallel: %d prompts could not be written to %s (%s: %s); they are not queued",
                          len(batch), self.journal.path, type(err).__name__, err)
                for q, item, future in batch:
                    q.push(item, incoming=True, queue_it=False)
                    future.set_exception(err)
                continue
            for q, item, future in batch:
                q.push(item, incoming=True)
                future.set_result(None)
