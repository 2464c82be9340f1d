"""Accepted prompts reach the write-ahead queue: into the staging log at once, into SQLite on this module's thread.

Every SQLite statement gives up the GIL, and the thread that gave it up then waits for it behind busy worker threads:
10-25 ms a statement beside one to three spinning threads on a 16-core host (``bench/gil_handover.py``). Measured
there (``bench/results/crash_safe_queue_device.md``, run 3), against the accepted prompts per second without a
store: one INSERT per request in its handler -38%; one INSERT per event-loop pass, the answer waiting for it
(this module until then) -17% (-59% in run 2); the same without the wait -15%; a copy into the memory-mapped
staging log and the INSERT on a thread -6%. The store as shipped (runs 5 and 6, 38 rounds): -2%, where the
store as it was before cost 41-60% of the mean rate.

So with ``synchronous=NORMAL`` (``staging.py`` says why that is as safe) the handler copies the prompt into the
staging log, queues it, and answers; no system call on the event loop. A worker records a prompt's start the same
way (``started``): a crash from then on counts for the prompt, and the worker never waits for SQLite before it runs
it. Deletions from the queue (``forget``) take the same path. This thread then writes what was staged to SQLite in
order, one INSERT and one UPDATE for whatever arrived since its last batch, and marks it moved in the log. (Waiting
5 ms after each wake-up to write larger batches was measured too: no difference beyond the benchmark's noise, so
the thread writes as soon as it wakes.) A worker writes a prompt's history entry itself, which also takes the
prompt out of SQLite, so it first waits until the prompt's row is there (``wait_stored``; by then it nearly always
is): a finished prompt's row never comes back.

Without the staging log (``synchronous=FULL``, whose fsync the answer must wait for, or a record that does not
fit) the answer waits for SQLite: on the event loop, one statement per loop pass (the handlers of a pass all add
their prompts, and the HTTP answers await the commit, ``MultiDeviceServer._handle``), and only then is the prompt
queued, so no worker starts a prompt the store does not have; from another thread (a custom node) this module's
thread writes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, Callable, Union

from .journal import MAX_ROWS_PER_STATEMENT, prompt_row, row_bytes
from .staging import ACCEPT, FORGET, START

if TYPE_CHECKING:
    from .journal import Journal
    from .staging import StagingLog

log = logging.getLogger("comfy_parallel")

Place = Callable[[bool], None]  # queues a stored prompt (True), or lets go of one that could not be stored (False)
STORED_WAIT_S = 30.0  # how long a worker waits for its prompt's row before it writes the history entry anyway
RETRY_DELAYS_S = (0.1, 0.5, 2.0)  # a failed write of staged prompts is tried again after these


@dataclass(frozen=True)
class _Staged:  # in the staging log and queued already; its row goes to SQLite
    seq: int
    row: tuple


@dataclass(frozen=True)
class _Started:  # a worker took it (staged, or None: the staging log was full)
    seq: int | None
    prompt_id: str
    device: int


@dataclass(frozen=True)
class _Requeued:  # running prompts that will run again: queued, not running (after their start is written)
    prompt_ids: list[str]


@dataclass(frozen=True)
class _Accept:  # not staged: stored, then placed, then its future is done
    route: str
    item: tuple
    place: Place
    future: Any


@dataclass(frozen=True)
class _Forget:
    seq: int | None  # None: not in the staging log
    prompt_ids: list[str]


@dataclass(frozen=True)
class _Flush:
    done: threading.Event


_Entry = Union[_Staged, _Started, _Requeued, _Accept, _Forget, _Flush]


class JournalWriter:
    """The staging log's writer side, the loop's batch, and the thread that writes SQLite."""

    def __init__(self, journal: "Journal", loop: asyncio.AbstractEventLoop | None = None,
                 staging: "StagingLog | None" = None) -> None:
        self.journal = journal
        self.loop = loop
        self.staging = staging
        self.loop_batch: list[_Accept] = []
        self.inbox: SimpleQueue[_Entry] = SimpleQueue()  # put never blocks nor gives the GIL up
        self.stored = threading.Condition()  # workers wait on it for their prompt's row; the loop never takes it
        self.unstored: set[str] = set()  # staged and queued, not in SQLite yet
        self.staging_full_logged = False
        self.thread = threading.Thread(target=self._run, name="comfy-parallel-journal", daemon=True)
        self.thread.start()

    # -- producers: the event loop, and any other thread --------------------------------------------------------
    def accept(self, route: str, item: tuple, place: Place) -> "Future | asyncio.Future | None":
        """Store ``item`` with ``route`` and ``place`` it (queue or pool it). None: both happened, the prompt is
        in the staging log. Otherwise a future, done once it is in SQLite and placed (or failed: then
        ``place(False)``)."""
        if self.staging is not None:
            try:
                row = prompt_row(route, item, time.time())
            except (TypeError, ValueError) as err:
                place(False)
                return self._failed(err)
            prompt_id = row[0]
            self.unstored.add(prompt_id)  # before the thread can see it, which takes it out again
            if self.staging.append(ACCEPT, row_bytes(row), lambda seq: self.inbox.put(_Staged(seq, row))):
                place(True)
                return None
            self.unstored.discard(prompt_id)
            self._log_staging_full()
        if self.loop is not None and _running_loop() is self.loop:
            loop_future: asyncio.Future = self.loop.create_future()
            if not self.loop_batch:
                self.loop.call_soon(self._commit_loop_batch)
            self.loop_batch.append(_Accept(route, item, place, loop_future))
            return loop_future
        future: Future = Future()
        self.inbox.put(_Accept(route, item, place, future))
        return future

    def forget(self, prompt_ids: list[str]) -> None:
        """Queued prompts a client deleted leave the store, after everything accepted before them."""
        if self.staging is None:  # every queued prompt is in SQLite already
            self.journal.forget_prompts(prompt_ids)
            return
        ids = [str(p) for p in prompt_ids]
        if not self.staging.append(FORGET, json.dumps(ids).encode(), lambda seq: self.inbox.put(_Forget(seq, ids))):
            self.inbox.put(_Forget(None, ids))

    def started(self, prompt_id: str, device: int) -> None:
        """A worker took ``prompt_id`` on ``device``: from now on a crash counts for it. Staged at once; without
        the staging log, written to SQLite before the worker goes on."""
        if self.staging is not None:
            if not self.staging.append(START, json.dumps([prompt_id, device]).encode(),
                                       lambda seq: self.inbox.put(_Started(seq, prompt_id, device))):
                self.inbox.put(_Started(None, prompt_id, device))  # full: behind its accept, but not crash-safe
            return
        try:
            self.journal.started(prompt_id, device)
        except Exception as err:  # it still runs; a crash now would run it as if it had not started
            log.error("comfy-parallel: start of %s not written to %s (%s: %s)", prompt_id, self.journal.path,
                      type(err).__name__, err)

    def requeued(self, prompt_ids: list[str]) -> None:
        """Running prompts that will run again (after out of memory): queued, behind their start."""
        self.inbox.put(_Requeued([str(p) for p in prompt_ids]))

    def _failed(self, err: Exception) -> "Future | asyncio.Future":
        if self.loop is not None and _running_loop() is self.loop:
            failed: asyncio.Future = self.loop.create_future()
            failed.set_exception(err)
            return failed
        future: Future = Future()
        future.set_exception(err)
        return future

    def _log_staging_full(self) -> None:
        if not self.staging_full_logged:
            assert self.staging is not None
            self.staging_full_logged = True
            log.warning("comfy-parallel: the staging log %s is full (the journal thread is behind, or a prompt is "
                        "larger than the log); until it has room, POST /prompt answers wait for SQLite (logged "
                        "once)", self.staging.path)

    def _commit_loop_batch(self) -> None:
        batch, self.loop_batch = self.loop_batch, []
        for start in range(0, len(batch), MAX_ROWS_PER_STATEMENT):
            self._accept_statement(batch[start:start + MAX_ROWS_PER_STATEMENT])

    # -- consumers: workers and a clean exit ------------------------------------------------------------------
    def wait_stored(self, prompt_id: str, timeout: float = STORED_WAIT_S) -> bool:
        """Until ``prompt_id``'s row is in SQLite (a worker, before it writes the prompt's history entry)."""
        if prompt_id not in self.unstored:
            return True
        with self.stored:
            ok = self.stored.wait_for(lambda: prompt_id not in self.unstored, timeout)
        if not ok:
            log.error("comfy-parallel: %s is still not written to %s after %.0f s; its history entry is written "
                      "anyway, and a restart may run it again", prompt_id, self.journal.path, timeout)
        return ok

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the thread has written what it was handed (before a clean exit); False if that took too long."""
        done = threading.Event()
        self.inbox.put(_Flush(done))
        return done.wait(timeout)

    # -- the thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            entries = [self.inbox.get()]
            while len(entries) < 10 * MAX_ROWS_PER_STATEMENT:
                try:
                    entries.append(self.inbox.get_nowait())
                except Empty:
                    break
            try:
                self._write(entries)
            except Exception:  # a bug here must not stop the thread: every later prompt would wait for it
                log.exception("comfy-parallel: the journal thread failed on %d entries", len(entries))

    def _write(self, entries: list[_Entry]) -> None:
        """In order: staged accepts and starts gather into one INSERT and one UPDATE (a start after its accept),
        prompts put from other threads without the staging log into INSERTs of their own; everything else waits
        until those are written."""
        rows: list[_Staged] = []
        starts: dict[str, int] = {}
        accepts: list[_Accept] = []
        seq = 0

        def written() -> None:
            nonlocal rows, starts, accepts
            if rows or starts:
                self._store_staged(rows, starts, seq)
            for start in range(0, len(accepts), MAX_ROWS_PER_STATEMENT):
                self._accept_statement(accepts[start:start + MAX_ROWS_PER_STATEMENT])
            rows, starts, accepts = [], {}, []

        for entry in entries:
            if isinstance(entry, _Staged):
                rows.append(entry)
                seq = entry.seq
                continue
            if isinstance(entry, _Started):
                starts[entry.prompt_id] = entry.device
                seq = entry.seq or seq
                continue
            if isinstance(entry, _Accept):
                accepts.append(entry)
                continue
            written()
            if isinstance(entry, _Forget):
                self._forget(entry)
            elif isinstance(entry, _Requeued):
                self._requeue(entry)
            else:
                entry.done.set()
        written()

    def _store_staged(self, rows: list[_Staged], starts: dict[str, int], seq: int) -> None:
        """Rows, then starts; then the log is marked (a restart must not bring back a prompt that finished), and
        only then may workers write the history entries that end those rows."""
        for delay in (*RETRY_DELAYS_S, None):
            try:
                for start in range(0, len(rows), MAX_ROWS_PER_STATEMENT):
                    self.journal.accepted_rows([e.row for e in rows[start:start + MAX_ROWS_PER_STATEMENT]])
                if starts:
                    self.journal.started_many(starts)
                break
            except Exception as err:
                if delay is None:
                    log.error("comfy-parallel: %d accepted prompts and %d starts could not be written to %s (%s: %s); "
                              "they run, but a crash before they end loses them: %s", len(rows), len(starts),
                              self.journal.path, type(err).__name__, err, ", ".join(e.row[0] for e in rows))
                else:
                    time.sleep(delay)
        if seq and self.staging is not None:
            self.staging.moved(seq)
        if rows:
            with self.stored:
                self.unstored.difference_update(e.row[0] for e in rows)
                self.stored.notify_all()

    def _requeue(self, entry: _Requeued) -> None:
        try:
            self.journal.requeued(entry.prompt_ids)
        except Exception as err:
            log.error("comfy-parallel: retry of %s not written to %s (%s: %s)", ", ".join(entry.prompt_ids),
                      self.journal.path, type(err).__name__, err)

    def _forget(self, entry: _Forget) -> None:
        try:
            self.journal.forget_prompts(entry.prompt_ids)
        except Exception as err:  # they would run again after a restart
            log.error("comfy-parallel: deleted prompts %s could not be taken out of %s (%s: %s)",
                      ", ".join(entry.prompt_ids), self.journal.path, type(err).__name__, err)
        if entry.seq is not None and self.staging is not None:
            self.staging.moved(entry.seq)

    def _accept_statement(self, run: list[_Accept]) -> None:
        try:
            self.journal.accepted_many([(e.route, e.item) for e in run])
        except Exception as err:  # not stored, so not queued: each client gets an error instead of an id
            log.error("comfy-parallel: %d prompts could not be written to %s (%s: %s); they are not queued",
                      len(run), self.journal.path, type(err).__name__, err)
            for e in run:
                e.place(False)
                if not e.future.done():  # done: its request was cancelled
                    e.future.set_exception(err)
            return
        for e in run:
            e.place(True)
            if not e.future.done():
                e.future.set_result(None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
