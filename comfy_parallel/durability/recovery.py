"""At start: the history and the unfinished prompts of the write-ahead queue (``journal.py``) come back.

The staging log first (``staging.py``): what the last run staged and had not written to SQLite yet goes there, in
the order it happened: accepted prompts, starts, deletions from the queue, history entries (each ending its
prompt's row) and deletions of history. Then history, before the HTTP
listener serves ``/history``: the ids of the stored entries, which
``GET /history/{id}`` answers from the store (the ``/history`` listing starts empty, as stock's; see
``queues.History``). Then, before the workers start, every unfinished prompt is queued again through the queues'
routing entry point (``DeviceQueues.route_put``) on the route it was accepted on (its device, or the pool), in its
order, with its id and ``extra_data``. A prompt that was running when the process died runs once more, on the
device it ran on, and its websocket client and history entry are told that this is a retry after a server crash;
one that was running at two crashes in a row is recorded as an error instead, so one poisonous workflow cannot
crash-loop the server. ``/ready`` answers ``recovering`` until this is done.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..scheduling.queues import MAXIMUM_HISTORY_SIZE
from .journal import (RUNNING, Journal, StoredPrompt, StoreUnsupported, as_queue_item, finish_from_bytes,
                      row_from_bytes)
from .staging import ACCEPT, FINISH, FORGET, FORGET_HISTORY, START, StagingLog

if TYPE_CHECKING:
    from ..scheduling.queues import DeviceQueues

log = logging.getLogger("comfy_parallel")

CRASHED_TWICE_MESSAGE = "server crashed twice while running this prompt"
RETRY_EVENT = "comfy_parallel_crash_retry"  # websocket message type and history status message
MAX_CRASHES = 2


class JournalInUse(RuntimeError):
    """Another process holds the store: two servers on one file would run every prompt twice."""


def open_journal(path: Path, synchronous: str = "NORMAL") -> Journal:
    """The store at ``path``; a file SQLite cannot read is moved aside (and logged) so the server still starts.

    Raises ``JournalInUse`` when another process has it open (its lock is exclusive; see ``journal.py``).
    """
    try:
        return Journal(path, synchronous)
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise JournalInUse(f"the write-ahead queue {path} is in use by another process (another comfy-parallel "
                               "server on the same user directory?); give each server its own --persist-path, or "
                               "stop the other one") from err
        return _move_aside(path, synchronous, err)
    except StoreUnsupported:  # this Python's fault, not the file's: keep it where it is
        raise
    except Exception as err:
        return _move_aside(path, synchronous, err)


def _move_aside(path: Path, synchronous: str, err: Exception) -> Journal:
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        log.error("comfy-parallel: the write-ahead queue %s cannot be read (%s: %s); moved to %s, starting empty",
                  path, type(err).__name__, err, aside)
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(Path(f"{aside}{suffix}"))
        return Journal(path, synchronous)


STAGING_SUFFIX = ".staging"
STAGING_MODES = ("OFF", "NORMAL")  # FULL: the answer waits for SQLite's fsync, which a page of the log lacks


def open_staging(journal: Journal, synchronous: str) -> StagingLog | None:
    """The staging log beside the store, after what it holds from the last run is in SQLite; None where the
    answers wait for SQLite instead (``synchronous=FULL``, or a log that cannot be made)."""
    path = journal.path.with_name(journal.path.name + STAGING_SUFFIX)
    use = synchronous.upper() in STAGING_MODES
    if not use and not path.exists():
        return None
    try:
        staging = StagingLog(path)
    except (OSError, ValueError) as err:
        log.error("comfy-parallel: the staging log %s cannot be used (%s: %s); POST /prompt answers wait for "
                  "SQLite%s", path, type(err).__name__, err, "" if use else "; prompts it held may be lost")
        return None
    apply_staged(journal, staging)
    if use:
        return staging
    staging.close()
    path.unlink()
    return None


def apply_staged(journal: Journal, staging: StagingLog) -> int:
    """Write the last run's staged records to SQLite, in order; return how many prompts were accepted there."""
    operations: list[tuple[int, Any]] = []
    for record in staging.left:
        try:
            if record.kind == ACCEPT:
                operations.append((ACCEPT, row_from_bytes(record.payload)))
            elif record.kind == START:
                prompt_id, device = json.loads(record.payload)
                operations.append((START, (str(prompt_id), int(device))))
            elif record.kind == FORGET:
                operations.append((FORGET, [str(p) for p in json.loads(record.payload)]))
            elif record.kind == FINISH:
                operations.append((FINISH, finish_from_bytes(record.payload)))
            elif record.kind == FORGET_HISTORY:
                ids = json.loads(record.payload)
                operations.append((FORGET_HISTORY, None if ids is None else [str(p) for p in ids]))
            else:
                raise ValueError(f"unknown kind {record.kind} (written by a newer comfy-parallel?)")
        except (ValueError, TypeError) as err:  # a power loss can leave a record half there
            log.error("comfy-parallel: staged record %d in %s cannot be read (%s: %s); it is left out",
                      record.seq, staging.path, type(err).__name__, err)
    journal.apply_staged(operations)
    counts = {kind: sum(k == kind for k, _ in operations) for kind in (ACCEPT, START, FORGET, FINISH, FORGET_HISTORY)}
    if staging.left:
        staging.moved(staging.left[-1].seq)
        log.info("comfy-parallel: %d prompts accepted, %d starts, %d deletions from the queue, %d history entries and "
                 "%d deletions of history in the last run's staging log %s are now in %s", counts[ACCEPT],
                 counts[START], counts[FORGET], counts[FINISH], counts[FORGET_HISTORY], staging.path, journal.path)
    staging.left = []
    return counts[ACCEPT]


def load_history(queues: "DeviceQueues", journal: Journal, prompt_server: Any) -> int:
    """Make the stored history answerable by id and new prompts number after every stored one."""
    ids = journal.history_ids(MAXIMUM_HISTORY_SIZE + 1)
    queues.history_store.load(ids)
    highest = journal.max_number()
    if highest is not None and hasattr(prompt_server, "number") and math.isfinite(highest):
        prompt_server.number = max(int(prompt_server.number), int(highest) + 1)
    if ids:
        log.info("comfy-parallel: %d history entries of earlier runs kept in %s (GET /history/{id} answers them; "
                 "the /history listing starts empty)", len(ids), journal.path)
    return len(ids)


def retry_message(prompt_id: str, gpu_id: int | None, crashes: int) -> dict:
    return {"prompt_id": prompt_id, "gpu_id": gpu_id, "retry_after_server_crash": True, "crashes": crashes,
            "message": "the server crashed while this prompt was running; it runs once more",
            "timestamp": int(time.time() * 1000)}


class CrashRetryNotifier:
    """A queue listener: when a prompt retried after a crash starts, its websocket client is told first."""

    def __init__(self, prompt_server: Any) -> None:
        self.prompt_server = prompt_server
        self.lock = threading.Lock()
        self.pending: dict[str, tuple[str | None, dict]] = {}

    def expect(self, prompt_id: str, client_id: str | None, message: dict) -> None:
        with self.lock:
            self.pending[prompt_id] = (client_id, message)

    def on_start(self, index: int, prompt_id: str, waited_s: float) -> None:
        with self.lock:
            client_id, message = self.pending.pop(prompt_id, (None, None))
        if message is not None:
            log.warning("[GPU %d] prompt %s runs again after a server crash", index, prompt_id)
            if client_id is not None and self.prompt_server is not None:
                self.prompt_server.send_sync(RETRY_EVENT, message, client_id)

    def on_done(self, index: int, prompt_id: str, status: dict | None, exec_s: float) -> None:
        pass

    def on_oom_retry(self, index: int) -> None:
        pass


def _crashed_twice(queues: "DeviceQueues", index: int | None, p: StoredPrompt, crashes: int,
                   prompt_server: Any) -> None:
    """Record ``p`` as an error in history (this also removes it from the store) and tell its client."""
    item = p.item
    error = {"prompt_id": p.prompt_id, "node_id": None, "node_type": None, "executed": [],
             "exception_type": "comfy_parallel.ServerCrash", "exception_message": CRASHED_TWICE_MESSAGE,
             "traceback": [], "current_inputs": {}, "current_outputs": [], "timestamp": int(time.time() * 1000)}
    status = {"status_str": "error", "completed": False,
              "messages": [(RETRY_EVENT, retry_message(p.prompt_id, index, crashes)), ("execution_error", error)]}
    entry = {"prompt": list(item[:5]), "outputs": {}, "status": status, "meta": {}, "gpu_id": index}
    queues.history_store.record(p.prompt_id, entry)
    for listener in queues.devices[index].listeners if index is not None else []:
        listener.on_done(index, p.prompt_id, status, 0.0)
    client_id = item[3].get("client_id") if isinstance(item[3], dict) else None
    if client_id is not None and prompt_server is not None:
        prompt_server.send_sync("execution_error", error, client_id)
        prompt_server.send_sync("executing", {"node": None, "prompt_id": p.prompt_id}, client_id)
    log.error("[GPU %s] prompt %s: %s; recorded as an error, not run again", "?" if index is None else index,
              p.prompt_id, CRASHED_TWICE_MESSAGE)


def requeue(queues: "DeviceQueues", journal: Journal, prompt_server: Any, item_length: int,
            notifier: CrashRetryNotifier) -> int:
    """Queue every unfinished prompt again, in order, on the route it was accepted on; return how many were
    queued."""
    prompts = journal.unfinished()
    if not prompts:
        return 0
    crashed = journal.count_crash()
    queued = retried = failed = 0
    n_devices = len(queues.devices)
    for p in prompts:
        route: str | None = p.route
        if not queues.serves(p.route):
            route = None
            log.warning("comfy-parallel: stored prompt %s was routed to %r, which this server does not have; it "
                        "takes the default route", p.prompt_id, p.route)
        ran_on = p.device if p.device is not None and 0 <= p.device < n_devices else None
        crashes = p.crashes + (p.state == RUNNING)
        if p.state == RUNNING and crashes >= MAX_CRASHES:
            _crashed_twice(queues, ran_on, p, crashes, prompt_server)
            failed += 1
            continue
        if crashes:
            # A retry runs alone, from a device's queue (DeviceQueue._next): where it ran, if this server has that
            # device; its stored route stays as accepted.
            route = str(ran_on) if ran_on is not None else str(queues.choose_device())
        if p.dropped_keys:
            log.warning("comfy-parallel: stored prompt %s runs without %s (secrets are not stored)", p.prompt_id,
                        ", ".join(p.dropped_keys))
        if crashes:
            message = retry_message(p.prompt_id, int(route), crashes)
            with queues.mutex:
                queues.crash_retries[p.prompt_id] = message
            client_id = p.item[3].get("client_id") if isinstance(p.item[3], dict) else None
            notifier.expect(p.prompt_id, client_id, message)
            retried += 1
        queues.route_put(as_queue_item(p, item_length), route, durable=False)  # its row is in the store already
        queued += 1
    log.info("comfy-parallel: restored %d persisted prompts from %s (%d were running when the server crashed; %d "
             "run again as a retry after a crash, %d crashed twice and are recorded as errors)", queued, journal.path,
             len(crashed), retried, failed)
    return queued
