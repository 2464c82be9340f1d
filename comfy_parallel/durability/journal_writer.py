"""What the write-ahead queue stores reaches it: into the staging log at once, into SQLite on this module's thread.

Every SQLite statement gives up the GIL, and the thread that gave it up then waits for it behind busy worker threads:
10-25 ms a statement beside one to three spinning threads on a 16-core host (``bench/gil_handover.py``). Measured
there (``bench/results/crash_safe_queue_device.md``, run 3), against the accepted prompts per second without a
store: one INSERT per request in its handler -38%; one INSERT per event-loop pass, the answer waiting for it
(this module until then) -17% (-59% in run 2); the same without the wait -15%; a copy into the memory-mapped
staging log and the INSERT on a thread -6%. On a 2-core host the SQLite statements cost nothing measurable
(``--variant no_sqlite``, ``bench/results/crash_safe_queue_cpu_variants.md``), but every wake-up of
this thread does: it then competes for the GIL with the event loop.

So with ``synchronous=NORMAL`` (``staging.py`` says why that is as safe) everything a prompt's life writes is a copy
into the staging log, and nobody waits for SQLite: the ``POST /prompt`` handler copies the prompt in, queues it and
answers (``accept``); a worker records the prompt's start (``started``: a crash from then on counts for it) and its
history entry (``finished``, which also ends its row) the same way; deletions from the queue and from history
(``forget``, ``forget_history``) too. This thread then writes what was staged to SQLite in order, in gathered
batches: after its first entry it waits ``GATHER_S`` for more (or less, when someone waits for it or the log is
filling), then writes the accepted prompts, starts and history entries of the batch in one statement
(``Journal.write_batch``), and marks them moved in the log. A prompt accepted and finished within one batch never
gets a row at all.

Without the staging log (``synchronous=FULL``, whose fsync the answer must wait for, or a record that does not
fit) the writer waits for SQLite: an accepted prompt is queued only once it is stored, on the event loop with one
statement per loop pass (the handlers of a pass all add their prompts, and the HTTP answers await the commit,
``MultiDeviceServer._handle``), from another thread (a custom node) on this module's thread; a history entry that
does not fit waits for this thread to write it, behind everything staged before it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, Callable, Union

from .journal import dumps, encode_item, finish_bytes, history_json, prompt_row, row_bytes
from .staging import ACCEPT, FINISH, FORGET, FORGET_HISTORY, START

if TYPE_CHECKING:
    from .journal import Journal
    from .staging import StagingLog

log = logging.getLogger("comfy_parallel")

Place = Callable[[bool], None]  # queues a stored prompt (True), or lets go of one that could not be stored (False)
# How long the thread gathers staged records after its first one before it writes them: each batch costs it a
# wake-up, the gathering wait and its statement, three takings of the GIL, whatever the batch's size.
GATHER_S = 0.25
MAX_BATCH = 4096  # entries the thread writes at most in one go (one JSON array of a few MB at most)
STORED_WAIT_S = 30.0  # how long a worker waits for an unstaged history entry before it goes on anyway
RETRY_DELAYS_S = (0.1, 0.5, 2.0)  # a failed write of staged records is tried again after these


@dataclass(frozen=True)
class Prepared:
    """An item encoded for the staging log (``journal.encode_item``), or why it cannot be (then ``encoded`` is
    None)."""

    encoded: tuple[str, str] | None
    error: Exception | None


@dataclass(frozen=True)
class _Staged:  # an accepted prompt, in the staging log and queued already; its row goes to SQLite
    seq: int
    row: tuple


@dataclass(frozen=True)
class _Started:  # a worker took it (staged, or None: the staging log was full)
    seq: int | None
    prompt_id: str
    device: int


@dataclass(frozen=True)
class _Finished:  # its history entry (staged; or None, and the worker waits for ``done``)
    seq: int | None
    prompt_id: str
    entry: str  # journal.history_json
    evicted: list[str]
    done: threading.Event | None = None


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
class _Forget:  # deleted from the queue
    seq: int | None  # None: not in the staging log
    prompt_ids: list[str]


@dataclass(frozen=True)
class _ForgetHistory:  # deleted from history (None: all of it)
    seq: int | None
    prompt_ids: list[str] | None


@dataclass(frozen=True)
class _Flush:
    done: threading.Event


_Entry = Union[_Staged, _Started, _Finished, _Requeued, _Accept, _Forget, _ForgetHistory, _Flush]


class JournalWriter:
    """The staging log's writer side, the loop's batch, and the thread that writes SQLite."""

    def __init__(self, journal: "Journal", loop: asyncio.AbstractEventLoop | None = None,
                 staging: "StagingLog | None" = None) -> None:
        self.journal = journal
        self.loop = loop
        self.staging = staging
        self.loop_batch: list[_Accept] = []
        self.inbox: SimpleQueue[_Entry] = SimpleQueue()  # put never blocks nor gives the GIL up
        self.urgent = threading.Event()  # someone waits for the thread, or the log fills: write without gathering
        self.staging_full_logged = False
        self.thread = threading.Thread(target=self._run, name="comfy-parallel-journal", daemon=True)
        self.thread.start()

    # -- producers: the event loop, workers, any other thread ---------------------------------------------------
    def prepare(self, item: tuple) -> "Prepared | None":
        """``item`` encoded as ``accept`` stages it; the caller does this before it takes its lock, inside which it
        accepts (a large workflow's JSON takes milliseconds to encode). None: nothing to encode ahead."""
        if self.staging is None:
            return None
        try:
            return Prepared(encode_item(item), None)
        except (TypeError, ValueError) as err:
            return Prepared(None, err)

    def accept(self, route: str, item: tuple, place: Place,
               prepared: "Prepared | None" = None) -> "Future | asyncio.Future | None":
        """Store ``item`` with ``route`` and ``place`` it (queue or pool it). None: both happened, the prompt is
        in the staging log. Otherwise a future, done once it is in SQLite and placed (or failed: then
        ``place(False)``). ``prepared``: ``prepare(item)``, if done already."""
        if self.staging is not None:
            prepared = prepared or self.prepare(item)
            assert prepared is not None
            if prepared.error is not None:
                place(False)
                return self._failed(prepared.error)
            row = prompt_row(route, item, time.time(), prepared.encoded)
            if self._stage(ACCEPT, row_bytes(row), lambda seq: _Staged(seq, row)):
                place(True)
                return None
            self._log_staging_full()
        if self.loop is not None and _running_loop() is self.loop:
            loop_future: asyncio.Future = self.loop.create_future()
            if not self.loop_batch:
                self.loop.call_soon(self._commit_loop_batch)
            self.loop_batch.append(_Accept(route, item, place, loop_future))
            return loop_future
        future: Future = Future()
        self._put_urgent(_Accept(route, item, place, future))
        return future

    def forget(self, prompt_ids: list[str]) -> None:
        """Queued prompts a client deleted leave the store, after everything accepted before them."""
        if self.staging is None:  # every queued prompt is in SQLite already
            self.journal.forget_prompts(prompt_ids)
            return
        ids = [str(p) for p in prompt_ids]
        if not self._stage(FORGET, dumps(ids), lambda seq: _Forget(seq, ids)):
            self.inbox.put(_Forget(None, ids))

    def started(self, prompt_id: str, device: int) -> None:
        """A worker took ``prompt_id`` on ``device``: from now on a crash counts for it. Staged at once; without
        the staging log, written to SQLite before the worker goes on."""
        if self.staging is not None:
            if not self._stage(START, dumps([prompt_id, device]),
                               lambda seq: _Started(seq, prompt_id, device)):
                self.inbox.put(_Started(None, prompt_id, device))  # full: behind its accept, but not crash-safe
            return
        try:
            self.journal.started(prompt_id, device)
        except Exception as err:  # it still runs; a crash now would run it as if it had not started
            log.error("comfy-parallel: start of %s not written to %s (%s: %s)", prompt_id, self.journal.path,
                      type(err).__name__, err)

    def finished(self, prompt_id: str, entry: dict, evicted: list[str]) -> None:
        """A worker's history entry for ``prompt_id`` (which ends its row); ``evicted``: entries beyond the
        history limit. Staged, or written before this returns; raises if it cannot be encoded or written."""
        encoded = history_json(entry)
        if self.staging is None:  # its row was written before it was queued
            self.journal.write_batch([], {}, [(prompt_id, encoded)], evicted)
            return
        if self._stage(FINISH, finish_bytes(prompt_id, encoded, evicted),
                       lambda seq: _Finished(seq, prompt_id, encoded, evicted)):
            return
        done = threading.Event()  # full: written by the thread, behind its prompt's row
        self._put_urgent(_Finished(None, prompt_id, encoded, evicted, done))
        if not done.wait(STORED_WAIT_S):
            log.error("comfy-parallel: the history entry of %s is still not written to %s after %.0f s; a restart "
                      "may run it again", prompt_id, self.journal.path, STORED_WAIT_S)

    def forget_history(self, prompt_ids: list[str] | None) -> None:
        """History entries a client deleted (None: all of them), after every entry written before."""
        if self.staging is None:
            self.journal.forget_history(prompt_ids)
            return
        ids = None if prompt_ids is None else [str(p) for p in prompt_ids]
        if not self._stage(FORGET_HISTORY, dumps(ids), lambda seq: _ForgetHistory(seq, ids)):
            self.inbox.put(_ForgetHistory(None, ids))

    def requeued(self, prompt_ids: list[str]) -> None:
        """Running prompts that will run again (after out of memory): queued, behind their start."""
        self.inbox.put(_Requeued([str(p) for p in prompt_ids]))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the thread has written what it was handed (before a clean exit); False if that took too long."""
        done = threading.Event()
        self._put_urgent(_Flush(done))
        return done.wait(timeout)

    def _stage(self, kind: int, payload: bytes, entry: Callable[[int], _Entry]) -> bool:
        """Into the staging log and the thread's inbox, in sequence order; False: it does not fit."""
        assert self.staging is not None
        if self.staging.append(kind, payload, lambda seq: self.inbox.put(entry(seq))) is None:
            return False
        if self.staging.filling:
            self.urgent.set()
        return True

    def _put_urgent(self, entry: _Entry) -> None:
        self.inbox.put(entry)
        self.urgent.set()

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
                        "larger than half the log); until it has room, POST /prompt answers wait for SQLite (logged "
                        "once)", self.staging.path)

    def _commit_loop_batch(self) -> None:
        batch, self.loop_batch = self.loop_batch, []
        self._accept_statement(batch)

    # -- the thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        behind = False  # the last batch was full: write the next at once
        while True:
            entries = [self.inbox.get()]
            if not behind and not self.urgent.is_set():
                self.urgent.wait(GATHER_S)
            self.urgent.clear()
            while len(entries) < MAX_BATCH:
                try:
                    entries.append(self.inbox.get_nowait())
                except Empty:
                    break
            behind = len(entries) == MAX_BATCH
            try:
                self._write(entries)
            except Exception:  # a bug here must not stop the thread: every later write would wait for it
                log.exception("comfy-parallel: the journal thread failed on %d entries", len(entries))

    def _write(self, entries: list[_Entry]) -> None:
        """In order: staged accepts, starts and history entries gather into one statement (a prompt accepted and
        finished in the gathering gets no row), prompts put from other threads without the staging log into one
        of their own; everything else waits until those are written."""
        rows: dict[str, _Staged] = {}
        starts: dict[str, int] = {}
        finishes: list[_Finished] = []
        ended: set[str] = set()
        accepts: list[_Accept] = []
        seq = 0

        def written() -> None:
            nonlocal rows, starts, finishes, ended, accepts
            if rows or starts or finishes:
                self._store_staged([e.row for pid, e in rows.items() if pid not in ended],
                                   {pid: d for pid, d in starts.items() if pid not in ended}, finishes, seq)
            if accepts:
                self._accept_statement(accepts)
            rows, starts, finishes, ended, accepts = {}, {}, [], set(), []

        for entry in entries:
            if isinstance(entry, _Staged):
                prompt_id = entry.row[0]
                if prompt_id in rows or prompt_id in ended:  # a prompt id used again: the earlier one first
                    written()
                rows[prompt_id] = entry
                seq = entry.seq
                continue
            if isinstance(entry, _Started):
                starts[entry.prompt_id] = entry.device
                seq = entry.seq or seq
                continue
            if isinstance(entry, _Finished):
                finishes.append(entry)
                ended.add(entry.prompt_id)
                seq = entry.seq or seq
                continue
            if isinstance(entry, _Accept):
                accepts.append(entry)
                continue
            written()
            if isinstance(entry, _Forget):
                self._forget(entry)
            elif isinstance(entry, _ForgetHistory):
                self._forget_history(entry)
            elif isinstance(entry, _Requeued):
                self._requeue(entry)
            else:
                entry.done.set()
        written()

    def _store_staged(self, rows: list[tuple], starts: dict[str, int], finishes: list[_Finished], seq: int) -> None:
        """Rows, then starts, then history entries (which end their rows); then the log is marked: a restart must
        not bring back a prompt that finished."""
        for delay in (*RETRY_DELAYS_S, None):
            try:
                self.journal.write_batch(rows, starts, [(f.prompt_id, f.entry) for f in finishes],
                                         [p for f in finishes for p in f.evicted])
                break
            except Exception as err:
                if delay is None:
                    log.error("comfy-parallel: %d accepted prompts, %d starts and %d history entries could not be "
                              "written to %s (%s: %s); they run, but a crash before they end loses them: %s",
                              len(rows), len(starts), len(finishes), self.journal.path, type(err).__name__, err,
                              ", ".join(row[0] for row in rows))
                else:
                    time.sleep(delay)
        if seq and self.staging is not None:
            self.staging.moved(seq)
        for f in finishes:
            if f.done is not None:
                f.done.set()

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

    def _forget_history(self, entry: _ForgetHistory) -> None:
        try:
            self.journal.forget_history(entry.prompt_ids)
        except Exception as err:  # they would come back after a restart
            log.error("comfy-parallel: deleted history entries %s could not be taken out of %s (%s: %s)",
                      "(all)" if entry.prompt_ids is None else ", ".join(entry.prompt_ids), self.journal.path,
                      type(err).__name__, err)
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
