"""One ComfyUI-compatible prompt queue per device, one shared history.

ComfyUI's HTTP handlers and its ``prompt_worker`` talk to ``PromptServer.prompt_queue`` through a small
interface (put/get/task_done, views of the queue, history, flags). ``DeviceQueue`` implements that interface
for one device; ``DeviceQueues`` implements it for the whole server and forwards each call to the device the
current request targets (or to all of them, merged, when the request has no target).

With ``--default-route pool`` untargeted prompts are not bound to a device when they arrive: they wait in one
``pool.Pool`` and a worker that goes idle takes the pooled prompt cheapest for it (late binding, see pool.py).

Every prompt comes in through one routing entry point, ``DeviceQueues.route_put``, with its *route*: a device
index as a string, or ``"pool"``. New prompts do, and so do the prompts a restart queues again from the
write-ahead queue (``recovery.py``), which stores each with the route it was accepted on; with the store, a new
prompt is written there before it is queued or pooled (``journal_writer.py``).

An item is ComfyUI's tuple ``(number, prompt_id, prompt, extra_data, outputs_to_execute[, sensitive])``; a
history entry is ComfyUI's dict plus ``gpu_id``, the index of the device that ran it.
"""

from __future__ import annotations

import copy
import heapq
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, NamedTuple

from . import worker_context
from .cuda_fatal import poisoning_error
from .pool import DEFAULT_SLACK, NO_RESIDENCY, FileResolver, Pool, Residency, Traits, traits_of

if TYPE_CHECKING:
    from ..durability.journal import Journal
    from ..durability.journal_writer import JournalWriter

log = logging.getLogger("comfy_parallel.queues")
POOL_ROUTE = "pool"  # the route string of a prompt accepted into the pool (stored as such)

MAXIMUM_HISTORY_SIZE = 10000  # ComfyUI's execution.MAXIMUM_HISTORY_SIZE


CONSECUTIVE_FAILURES_BEFORE_REBUILD = 3


class RebuildExecutor(BaseException):
    """Raised from ``get`` into ComfyUI's prompt_worker loop so the device worker starts it with a new executor.

    A BaseException: ComfyUI's loop must not swallow it.
    """


class QueueStats(NamedTuple):
    gpu_id: int
    queued: int
    running: int


def is_oom(status: dict | None) -> bool:
    for event, data in (status or {}).get("messages", []):
        if event == "execution_error" and "OutOfMemoryError" in str(data.get("exception_type", "")):
            return True
    return False


def outcome_of(status: dict | None) -> str:
    """success, error or interrupted, from ComfyUI's status dict of a finished prompt."""
    if status is None:
        return "error"
    if status.get("status_str") == "success":
        return "success"
    if any(event == "execution_interrupted" for event, _ in status.get("messages", [])):
        return "interrupted"
    return "error"


def shutdown_error(item: tuple, message: str) -> dict:
    """The execution_error of a prompt that will never run: ComfyUI's own fields, so clients show it as any error."""
    return {"prompt_id": item[1], "node_id": None, "node_type": None, "executed": [],
            "exception_type": "comfy_parallel.Shutdown", "exception_message": message, "traceback": [],
            "current_inputs": {}, "current_outputs": [], "timestamp": int(time.time() * 1000)}


class History:
    """The one history all device queues write to, in completion order (ComfyUI's dict semantics).

    ``entries`` is this process's history, what ``GET /history`` lists and pages through: as stock's, it starts
    empty at every start (a crash or a clean stop alike) and holds what finishes from then on, prompts that the
    restart queued again included. With a journal every entry is also written to it, in the statement that
    removes the prompt from the write-ahead queue, so the last ``MAXIMUM_HISTORY_SIZE`` entries survive the
    process; those of earlier processes (``earlier``, ids only) are read from the store when a client asks for one
    by id (``GET /history/{id}``, 0.33's ``/api/jobs/{id}``).
    """

    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock
        self.entries: dict[str, dict] = {}
        self.earlier: dict[str, None] = {}  # ids of the stored entries of earlier processes, oldest first
        self.journal: "Journal | None" = None
        self.writer: "JournalWriter | None" = None  # with a journal: stages each entry (journal_writer.py)

    def record(self, prompt_id: str, entry: dict, write: bool = True) -> list[str]:
        """Add ``entry``; return the ids evicted beyond the limit. ``write=False``: the caller calls ``write``
        itself once it has let go of the queue lock (a worker must not hold every device's lock during I/O)."""
        with self.lock:
            evicted = []
            if len(self.entries) > MAXIMUM_HISTORY_SIZE:
                evicted.append(next(iter(self.entries)))
                self.entries.pop(evicted[0])
            self.earlier.pop(prompt_id, None)
            while self.earlier and len(self.earlier) + len(self.entries) > MAXIMUM_HISTORY_SIZE:
                oldest = next(iter(self.earlier))
                del self.earlier[oldest]
                evicted.append(oldest)
            self.entries[prompt_id] = entry
        if write:
            self.write(prompt_id, entry, evicted)
        return evicted

    def write(self, prompt_id: str, entry: dict, evicted: list[str]) -> None:
        """Into the journal: the entry, and the prompt leaves the write-ahead queue."""
        if self.journal is None:
            return
        try:
            if self.writer is not None:
                self.writer.finished(prompt_id, entry, evicted)
            else:
                self.journal.finished(prompt_id, entry, evicted)
        except Exception as err:  # the prompt ran; a store failure must not take the worker down
            log.error("comfy-parallel: history entry of %s not written to %s (%s: %s); it runs again if the server "
                      "crashes before the store works", prompt_id, self.journal.path, type(err).__name__, err)

    def load(self, prompt_ids: list[str]) -> None:
        """The ids of the entries earlier processes stored (oldest first), before anything is recorded in this one."""
        with self.lock:
            self.earlier = dict.fromkeys(prompt_ids)

    def get(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1,
            map_function: Callable[[dict], dict] | None = None) -> dict:
        # WARNING: mirrors execution.PromptQueue.get_history (ComfyUI 0.3.52-0.33) so /history pages alike.
        with self.lock:
            if prompt_id is None:
                out = {}
                i = 0
                if offset < 0 and max_items is not None:
                    offset = len(self.entries) - max_items
                for k, entry in self.entries.items():
                    if i >= offset:
                        out[k] = map_function(entry) if map_function is not None else entry
                        if max_items is not None and len(out) >= max_items:
                            break
                    i += 1
                return out
            if prompt_id in self.entries:
                entry = self.entries[prompt_id]
                return {prompt_id: copy.deepcopy(entry) if map_function is None else map_function(entry)}
            stored = prompt_id in self.earlier and self.journal is not None
        if stored:
            entry = self._read(prompt_id)  # outside the queue lock: a read of the store
            if entry is not None:
                return {prompt_id: entry if map_function is None else map_function(entry)}
        return {}

    def _read(self, prompt_id: str) -> dict | None:
        assert self.journal is not None
        try:
            return self.journal.history_entry(prompt_id)
        except Exception as err:  # answered as unknown, as stock answers after a restart
            log.error("comfy-parallel: history entry of %s not read from %s (%s: %s)", prompt_id, self.journal.path,
                      type(err).__name__, err)
            return None

    def wipe(self) -> None:
        with self.lock:
            self.entries.clear()
            self.earlier.clear()
        self._forget(None)

    def delete(self, prompt_id: str) -> None:
        with self.lock:
            self.entries.pop(prompt_id, None)
            self.earlier.pop(prompt_id, None)
        self._forget([prompt_id])

    def _forget(self, prompt_ids: list[str] | None) -> None:
        """Out of the journal too (None: every entry), after the entries written before."""
        if self.writer is not None:
            self.writer.forget_history(prompt_ids)
        elif self.journal is not None:
            self.journal.forget_history(prompt_ids)


class _SharedHistoryAccess:
    """The history part of ComfyUI's PromptQueue contract: every queue reads and edits the one history."""

    history_store: History

    @property
    def history(self) -> dict:
        return self.history_store.entries

    def get_history(self, *args: Any, **kwargs: Any) -> dict:
        return self.history_store.get(*args, **kwargs)

    def wipe_history(self) -> None:
        self.history_store.wipe()

    def delete_history_item(self, id_to_delete: str) -> None:
        self.history_store.delete(id_to_delete)


class DeviceQueue(_SharedHistoryAccess):
    """ComfyUI's PromptQueue contract for one device; the device's worker is its only consumer."""

    def __init__(self, index: int, lock: threading.RLock, history: History,
                 on_change: Callable[[], None]) -> None:
        self.index = index
        self.mutex = lock
        self.not_empty = threading.Condition(lock)
        self.history_store = history
        self.on_change = on_change
        self.task_counter = 0
        self.queue: list[tuple] = []
        self.currently_running: dict[int, tuple] = {}
        self.started_at: dict[int, float] = {}
        self.enqueued_at: dict[str, float] = {}
        self.flags: dict[str, Any] = {}
        self.listeners: list[Any] = []
        self.oom_retried: set[str] = set()
        # Prompts queued again after a server crash while they ran: prompt id -> the history message saying so.
        # One dict for every device (DeviceQueues sets it): while it holds any, they run alone (``_next``).
        self.crash_retries: dict[str, dict] = {}
        # Prompts whose history entry is being written to the store (one set for every device): until it is, a
        # crash would count them as running, so a crash retry must not start beside them (``_next``).
        self.finishing: set[str] = set()
        self.incoming = 0  # prompts routed here and being stored, not queued yet (they count for the shortest queue)
        self.peers: list[DeviceQueue] = [self]  # every device's queue (they share ``mutex``): DeviceQueues sets it
        # Called (and expected never to return) when a prompt's error shows a CUDA context is poisoned.
        self.on_fatal: Callable[[int, str, str], None] | None = None
        self.consecutive_failures = 0
        self.rebuild_requested = False
        # Shutdown: ``held`` keeps queued prompts from starting, ``parked`` says the worker waits in ``get``,
        # ``closed`` drops the results of prompts that were cut off (they are in the store and run again).
        self.held = False
        self.parked = False
        self.closed = False
        # --default-route pool: the shared pool this worker also takes from, and whether a put woke it already
        self.pool: Pool | None = None
        self.wake_pending = False
        self.writer: "JournalWriter | None" = None  # set by DeviceQueues.writer: writes starts, orders history

    @property
    def journal(self) -> "Journal | None":
        return self.history_store.journal

    # -- producer side (HTTP) -------------------------------------------------------------------------------
    def put(self, item: tuple) -> None:
        """Into this device's queue now (``DeviceQueues.route_put`` stores a new prompt first)."""
        with self.mutex:
            heapq.heappush(self.queue, item)
            self.enqueued_at[item[1]] = time.monotonic()
            self.on_change()
            self.not_empty.notify()

    # -- consumer side (the device's worker, through ComfyUI's prompt_worker) ---------------------------------
    def get(self, timeout: float | None = None) -> tuple[tuple, int] | None:
        with self.not_empty:
            if self.rebuild_requested:
                self.rebuild_requested = False
                if self.pool is not None:
                    self.pool.forget_worker(self.index)
                raise RebuildExecutor()
            item = self._next()
            while item is None:
                self.parked = True
                try:
                    self.not_empty.wait(timeout=timeout)
                finally:
                    self.parked = False
                    self.wake_pending = False
                item = self._next()
                if item is None and timeout is not None:
                    return None
            ctx = worker_context.get(self.index)
            if ctx is not None:  # it shows as running from the next line on: an interrupt from now on is for it
                ctx.begin_prompt()
            i = self.task_counter
            self.currently_running[i] = copy.deepcopy(item)
            self.task_counter += 1
            now = time.monotonic()
            self.started_at[i] = now
            waited = now - self.enqueued_at.pop(item[1], now)
            if self.pool is not None:
                self.pool.start(self.index, item[1])
        # Outside the queue lock, which every device and the HTTP handlers share: a store write gives up the GIL.
        if self.writer is not None:  # before anything says it started: a crash from now on counts for it
            self.writer.started(item[1], self.index)
        for listener in self.listeners:
            listener.on_start(self.index, item[1], waited)
        self.on_change()
        return item, i

    def _next(self) -> tuple | None:
        """This worker's next item, taken out of the queue or the pool; ``None`` if none may start now.

        After a crash, the prompts that were running at it (``crash_retries``, always queued on a device) run one at
        a time with nothing else running on any device: if one of them crashes the server again, it alone was
        running, so only the prompt that crashes the server is recorded as crashed twice, never a neighbour.
        Otherwise a pooled prompt older than this queue's head (the cheapest for this worker, see pool.py), else
        that head.
        """
        if self.held:
            return None
        if self.crash_retries:
            if self.finishing or any(peer.currently_running for peer in self.peers):
                return None
            position = next((i for i, item in enumerate(self.queue) if item[1] in self.crash_retries), None)
            if position is None:
                return None
            item = self.queue.pop(position)
            heapq.heapify(self.queue)
            return item
        pool = self.pool
        if pool is not None and len(pool):
            pick = pool.take(self.index, self.queue[0][0] if self.queue else None)
            if pick is not None:
                pooled = pick.pooled
                self.enqueued_at[pooled.prompt_id] = pooled.enqueued_at
                log.info("[GPU %d] took pooled prompt %s (%s; model files %s, %s)", self.index, pooled.prompt_id,
                         pick.reason, "loaded" if pick.model_hit else
                         f"{pick.missing_bytes / 2**30:.2f} GiB to load" if pick.missing_bytes else "none",
                         "executor cache reused" if pick.cache_hit else "no cache reuse")
                return pooled.item
        if self.queue:
            return heapq.heappop(self.queue)
        return None

    def _wake_peers(self) -> None:
        """A prompt ended or left: workers waiting for a crash retry to run alone may start now."""
        for peer in self.peers:
            peer.not_empty.notify()

    def task_done(self, item_id: int, history_result: dict, status: Any = None,
                  process_item: Callable[[tuple], tuple] | None = None) -> None:
        with self.mutex:
            if self.closed:
                self.currently_running.pop(item_id, None)
                self.started_at.pop(item_id, None)
                return
            if self.crash_retries:  # only they wait for running prompts to end (``_next``)
                self._wake_peers()
            item = self.currently_running.pop(item_id)
            started = self.started_at.pop(item_id, time.monotonic())
            status_dict = copy.deepcopy(status._asdict()) if status is not None else None
            reason = poisoning_error(status_dict)
            if reason is not None and self.on_fatal is not None:
                self.on_fatal(self.index, item[1], reason)
            if self._retry_after_oom(item, status_dict):
                retried = item[1]
            else:
                retried = None
                self._count_failure(status_dict)
                retry = self.crash_retries.pop(item[1], None)
                if retry is not None and status_dict is not None:
                    status_dict["messages"].append(("comfy_parallel_crash_retry", retry))
                prompt = process_item(item) if process_item is not None else item
                entry = {"prompt": prompt, "outputs": {}, "status": status_dict}
                entry.update(history_result)
                entry["gpu_id"] = self.index
                evicted = self.history_store.record(prompt[1], entry, write=False)
                # Only a crash retry waits for it (``_next``); none is added once the workers run.
                tracked = self.journal is not None and bool(self.crash_retries)
                if tracked:
                    self.finishing.add(prompt[1])
                if self.pool is not None:
                    self.pool.finished(prompt[1])
                for listener in self.listeners:
                    listener.on_done(self.index, prompt[1], status_dict, time.monotonic() - started)
                self.on_change()
        # Outside the queue lock, which every device and the HTTP handlers share.
        if retried is None:
            self.history_store.write(prompt[1], entry, evicted)
            if tracked:
                with self.mutex:
                    self.finishing.discard(prompt[1])
                    self._wake_peers()
        elif self.writer is not None:
            self.writer.requeued([retried])  # it runs again: not running, so not a crash if the server dies now

    def _retry_after_oom(self, item: tuple, status: dict | None) -> bool:
        """Out of memory: free this device (models and executor cache) and run the prompt once more."""
        prompt_id = item[1]
        if not is_oom(status):
            self.oom_retried.discard(prompt_id)
            return False
        if prompt_id in self.oom_retried:
            self.oom_retried.discard(prompt_id)
            status["messages"].append(("comfy_parallel_oom", {  # type: ignore[index]
                "prompt_id": prompt_id, "gpu_id": self.index,
                "message": f"out of memory on device {self.index} again after freeing it and retrying once"}))
            return False
        self.oom_retried.add(item[1])
        self.flags["free_memory"] = True  # ComfyUI's loop unloads this device's models and resets its executor
        heapq.heappush(self.queue, item)
        self.enqueued_at[item[1]] = time.monotonic()
        for listener in self.listeners:
            listener.on_oom_retry(self.index)
        self.on_change()
        return True

    def quiet_message(self, event: str, data: Any) -> bool:
        """Whether a websocket message of this device's worker must not reach its client.

        A prompt's first out-of-memory error is retried (``_retry_after_oom``): its ``execution_error`` and the
        ``executing`` end-of-prompt message that follows would tell the client the prompt failed and ended, and
        then it runs again. History and metrics still record that OOM.
        """
        if not isinstance(data, dict):
            return False
        prompt_id = data.get("prompt_id")
        if event == "execution_error":
            with self.mutex:
                return "OutOfMemoryError" in str(data.get("exception_type", "")) and prompt_id not in self.oom_retried
        if event == "executing" and data.get("node") is None:
            with self.mutex:
                return prompt_id in self.oom_retried and any(item[1] == prompt_id for item in self.queue)
        return False

    def _count_failure(self, status: dict | None) -> None:
        outcome = outcome_of(status)
        if outcome == "success":
            self.consecutive_failures = 0
            return
        if outcome == "interrupted":
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= CONSECUTIVE_FAILURES_BEFORE_REBUILD:
            self.consecutive_failures = 0
            self.rebuild_requested = True

    # -- views and edits -------------------------------------------------------------------------------------
    def get_current_queue(self) -> tuple[list, list]:
        with self.mutex:
            return list(self.currently_running.values()), copy.deepcopy(self.queue)

    def get_current_queue_volatile(self) -> tuple[list, list]:
        with self.mutex:
            return list(self.currently_running.values()), copy.copy(self.queue)

    def get_tasks_remaining(self) -> int:
        with self.mutex:
            return len(self.queue) + len(self.currently_running) + self.incoming

    def running_prompt_ids(self) -> list[str]:
        with self.mutex:
            return [item[1] for item in self.currently_running.values()]

    def stats(self) -> QueueStats:
        with self.mutex:
            return QueueStats(self.index, len(self.queue), len(self.currently_running))

    def wipe_queue(self) -> list[str]:
        """Drop every queued prompt; return their ids (the caller forgets them in the store, outside the lock)."""
        with self.mutex:
            dropped = [item[1] for item in self.queue]
            for prompt_id in dropped:
                self.enqueued_at.pop(prompt_id, None)
                self.crash_retries.pop(prompt_id, None)
                if self.pool is not None:
                    self.pool.finished(prompt_id)
            self.queue = []
            self._wake_peers()
            self.on_change()
        return dropped

    def delete_queue_item(self, function: Callable[[tuple], bool]) -> str | None:
        """Drop the first queued prompt ``function`` matches; return its id, or ``None``."""
        with self.mutex:
            for x in range(len(self.queue)):
                if function(self.queue[x]):
                    item = self.queue.pop(x)
                    heapq.heapify(self.queue)
                    self.enqueued_at.pop(item[1], None)
                    self.crash_retries.pop(item[1], None)
                    if self.pool is not None:
                        self.pool.finished(item[1])
                    self._wake_peers()
                    self.on_change()
                    return str(item[1])
        return None

    def set_flag(self, name: str, data: Any) -> None:
        with self.mutex:
            self.flags[name] = data
            self.not_empty.notify()

    def fail_queued(self, message: str) -> list[tuple[tuple, dict]]:
        """Record every queued prompt in history as an error (it will never run); return (item, error) pairs."""
        failed: list[tuple[tuple, dict]] = []
        with self.mutex:
            dropped, self.queue = sorted(self.queue), []
            for item in dropped:
                self.enqueued_at.pop(item[1], None)
                error = shutdown_error(item, message)
                status = {"status_str": "error", "completed": False, "messages": [("execution_error", error)]}
                entry = {"prompt": item[:5] + item[6:], "outputs": {}, "status": status, "meta": {},
                         "gpu_id": self.index}
                self.history_store.record(item[1], entry)
                if self.pool is not None:
                    self.pool.finished(item[1])
                for listener in self.listeners:
                    listener.on_done(self.index, item[1], status, 0.0)
                failed.append((item, error))
            if failed:
                self.on_change()
        return failed

    def get_flags(self, reset: bool = True) -> dict:
        with self.mutex:
            if not reset:
                return self.flags.copy()
            ret, self.flags = self.flags, {}
        freeing = bool(ret.get("unload_models") or ret.get("free_memory"))
        ctx = worker_context.current()
        if ret and ctx is not None:
            # /free asked this device to release memory: let the next soft_empty_cache really empty it.
            ctx.allow_empty_cache = True
            # and its next full garbage collection run, not be skipped for another worker's (gc-once-per-interval)
            ctx.collect_requested = freeing
        if self.pool is not None and freeing:
            with self.mutex:
                self.pool.forget_worker(self.index)  # ComfyUI's loop now unloads models / resets its executor
        return ret


class DeviceQueues(_SharedHistoryAccess):
    """The server's ``prompt_queue``: routes each call to the request's target device, or merges all devices.

    ``current_route`` returns the routing decision of the HTTP request being handled (an object with
    ``target: int | None``, ``assigned: int | None``, ``pooled: bool`` and ``stored``), or ``None`` outside a
    request. An untargeted ``put`` goes to the pool (``default_route="pool"``) or to the device ``choose_device``
    picks. ``residency(index)`` says which model files are loaded on a worker's device; ``find_model(name)`` where
    a model file a prompt names lies (both only matter to the pool). With a write-ahead queue, ``writer`` is set
    (``MultiDeviceServer``) and every new prompt is stored before it is queued.
    """

    def __init__(self, n_devices: int, current_route: Callable[[], Any],
                 default_route: str | int = "auto", on_change: Callable[[int | None], None] | None = None,
                 slack: int = DEFAULT_SLACK, residency: Callable[[int], Residency] | None = None,
                 find_model: Callable[[str], str | None] | None = None) -> None:
        self.mutex = threading.RLock()
        self.history_store = History(self.mutex)
        self._on_change = on_change or (lambda _index: None)
        self.devices = [DeviceQueue(i, self.mutex, self.history_store, self._changed_callback(i))
                        for i in range(n_devices)]
        self.crash_retries: dict[str, dict] = {}  # see DeviceQueue.crash_retries
        self.finishing: set[str] = set()  # see DeviceQueue.finishing
        for q in self.devices:
            q.peers = self.devices
            q.crash_retries = self.crash_retries
            q.finishing = self.finishing
        self.current_route = current_route
        self.default_route = default_route
        self._writer: "JournalWriter | None" = None
        self.pool: Pool | None = None
        self.resolver: FileResolver | None = None
        if default_route == POOL_ROUTE:
            self.pool = Pool(n_devices, slack, residency or (lambda index: NO_RESIDENCY))
            self.resolver = FileResolver(find_model) if find_model is not None else None
            for q in self.devices:
                q.pool = self.pool

    @property
    def journal(self) -> "Journal | None":
        return self.history_store.journal

    @property
    def writer(self) -> "JournalWriter | None":
        """Stores accepted prompts (journal_writer.py); None: no store."""
        return self._writer

    @writer.setter
    def writer(self, writer: "JournalWriter | None") -> None:
        self._writer = writer
        self.history_store.writer = writer
        for q in self.devices:
            q.writer = writer

    def _target(self) -> int | None:
        route = self.current_route()
        return None if route is None else route.target

    def _changed_callback(self, index: int) -> Callable[[], None]:
        return lambda: self._on_change(index)

    def add_listener(self, listener: Any) -> None:
        for q in self.devices:
            q.listeners.append(listener)

    def _scope(self) -> list[DeviceQueue]:
        target = self._target()
        return self.devices if target is None else [self.devices[target]]

    def _pool_in_scope(self) -> Pool | None:
        """The pool belongs to the merged view: a device's own view (a target) shows only what is bound to it."""
        return self.pool if self._target() is None else None

    def choose_device(self) -> int:
        """Shortest queue (queued + running), ties to the lowest index; or the fixed default route."""
        if isinstance(self.default_route, int) or str(self.default_route).isdigit():
            return int(self.default_route)
        with self.mutex:
            return min(range(len(self.devices)), key=lambda i: (self.devices[i].get_tasks_remaining(), i))

    def traits(self, item: tuple) -> Traits | None:
        """What the pool needs to know of ``item`` (None without a pool); reads the file system, so call it
        outside the mutex."""
        return traits_of(item, self.resolver) if self.pool is not None else None

    def serves(self, route: str) -> bool:
        """Whether ``route`` is one of this server's: one of its devices' indexes, or the pool's route (which a
        server without a pool serves by its default route)."""
        return route == POOL_ROUTE or (route.isdigit() and int(route) < len(self.devices))

    # -- the PromptQueue interface that ComfyUI's server.py uses --------------------------------------------
    def put(self, item: tuple) -> int | None:
        """Queue ``item`` where the current request routes it; the device index, or ``None`` when pooled."""
        target = self._target()
        return self.route_put(item, POOL_ROUTE if target is None and self.pool is not None
                              else str(target) if target is not None else None)

    def route_put(self, item: tuple, route: str | None, durable: bool = True) -> int | None:
        """The one routing entry point: ``route`` is a device index as a string, ``"pool"``, or ``None`` for
        the default route. A stored prompt comes back through here at a restart with the route it was accepted on
        (``durable=False``: it is in the store already).

        With a write-ahead queue a new prompt is stored first, with the route it took (a device index, or
        ``"pool"``), and queued or pooled once stored; the current request's ``stored`` future is done then.
        """
        traits = self.traits(item)
        writer = self.writer if durable else None
        prepared = writer.prepare(item) if writer is not None else None  # its JSON, before the lock
        stored: Future | Any = None
        with self.mutex:
            index: int | None
            if route is not None and route.isdigit() and int(route) < len(self.devices):
                index = int(route)
            elif route is not None and route != POOL_ROUTE:
                raise ValueError(f"route {route!r}: not a device of this server (0..{len(self.devices) - 1}) "
                                 f"or {POOL_ROUTE!r}")
            elif self.pool is not None:
                index = None
            else:
                index = self.choose_device()
            if writer is None:
                self._place(item, index, traits)
            else:
                # In the lock, so that the handler takes it once: a copy into the staging log (no system call)
                # that places the prompt at once, or a future that places it once SQLite has it.
                if index is not None:
                    self.devices[index].incoming += 1
                stored = writer.accept(POOL_ROUTE if index is None else str(index), item,
                                       lambda queue_it: self._place(item, index, traits, queue_it, True), prepared)
        current = self.current_route()
        if current is not None:
            current.assigned = index
            current.pooled = index is None
            current.stored = stored
        return index

    def _place(self, item: tuple, index: int | None, traits: Traits | None, queue_it: bool = True,
               incoming: bool = False) -> None:
        """Into the pool (``index`` None) or device ``index``'s queue now; ``queue_it=False``: it could not be
        stored, so it goes nowhere (``incoming``: it was counted while it was being stored)."""
        with self.mutex:
            if incoming and index is not None:
                self.devices[index].incoming -= 1
            if not queue_it:
                return
            if index is None:
                assert self.pool is not None and traits is not None
                pooled = self.pool.add(item, traits)
                self._wake_for(pooled.traits)
                self._on_change(None)
            else:
                if self.pool is not None and traits is not None:
                    self.pool.note_bound(str(item[1]), traits)
                self.devices[index].put(item)

    def _wake_for(self, traits: Traits) -> None:
        """Wake the idle worker for which a new pooled prompt is cheapest, unless enough are already woken."""
        assert self.pool is not None
        woken = sum(q.wake_pending for q in self.devices)
        if len(self.pool) <= woken:
            return
        idle = [q.index for q in self.devices if q.parked and not q.held and not q.wake_pending]
        index = self.pool.cheapest_worker(traits, idle)
        if index is not None:
            q = self.devices[index]
            q.wake_pending = True
            q.not_empty.notify()

    def get_current_queue(self) -> tuple[list, list]:
        return self._merged_queue(volatile=False)

    def get_current_queue_volatile(self) -> tuple[list, list]:
        return self._merged_queue(volatile=True)

    def _merged_queue(self, volatile: bool) -> tuple[list, list]:
        """(running, queued) of the devices in scope, then the pool's prompts; copies unless ``volatile``
        (ComfyUI's two methods differ only in that)."""
        running: list = []
        queued: list = []
        with self.mutex:
            for q in self._scope():
                r, p = q.get_current_queue_volatile() if volatile else q.get_current_queue()
                running += r
                queued += p
            pool = self._pool_in_scope()
            if pool is not None:
                queued += pool.items() if volatile else copy.deepcopy(pool.items())
        return running, queued

    def get_tasks_remaining(self) -> int:
        with self.mutex:
            pool = self._pool_in_scope()
            return sum(q.get_tasks_remaining() for q in self._scope()) + (len(pool) if pool is not None else 0)

    def wipe_queue(self) -> None:
        with self.mutex:
            dropped: list[str] = []
            pool = self._pool_in_scope()
            if pool is not None:
                dropped += [p.prompt_id for p in pool.clear()]
                if dropped:
                    self._on_change(None)
            for q in self._scope():
                dropped += q.wipe_queue()
        self._forget(dropped)

    def delete_queue_item(self, function: Callable[[tuple], bool]) -> bool:
        with self.mutex:
            deleted: str | None = None
            pool = self._pool_in_scope()
            if pool is not None and (pooled := pool.remove_first(function)) is not None:
                deleted = pooled.prompt_id
                self._on_change(None)
            for q in self._scope():
                if deleted is not None:
                    break
                deleted = q.delete_queue_item(function)
        if deleted is None:
            return False
        self._forget([deleted])
        return True

    def _forget(self, prompt_ids: list[str]) -> None:
        """Queued prompts a client deleted leave the write-ahead queue (outside the queue lock): they never run."""
        if prompt_ids and self.writer is not None:
            self.writer.forget(prompt_ids)

    def set_flag(self, name: str, data: Any) -> None:
        for q in self._scope():
            q.set_flag(name, data)

    def interrupt_if_running(self, prompt_id: str) -> bool:
        """ComfyUI 0.33's Jobs API cancel: stop ``prompt_id`` if a worker in this request's scope runs it now.

        Stock sets the one process-wide flag under the queue mutex; here only the worker running the prompt is
        told (its context's flag), under the same mutex, so the cancel cannot land on a prompt started since.
        """
        with self.mutex:
            for q in self._scope():
                if prompt_id in q.running_prompt_ids():
                    ctx = worker_context.get(q.index)
                    if ctx is None:
                        return False
                    ctx.set_interrupt(True)
                    return True
        return False

    def get_flags(self, reset: bool = True) -> dict:
        merged: dict = {}
        for q in self._scope():
            merged.update(q.get_flags(reset))
        return merged

    # -- attributes some custom nodes read directly -----------------------------------------------------------
    @property
    def queue(self) -> list:
        return self.get_current_queue_volatile()[1]

    @property
    def currently_running(self) -> dict:
        with self.mutex:
            return {f"{q.index}:{k}": v for q in self.devices for k, v in q.currently_running.items()}

    # -- multi-device views -----------------------------------------------------------------------------------
    def stats(self) -> list[QueueStats]:
        with self.mutex:
            return [q.stats() for q in self.devices]

    def pool_stats(self) -> dict | None:
        """Length, oldest wait, slack and per-device picks of the pool; ``None`` without one."""
        with self.mutex:
            return self.pool.stats() if self.pool is not None else None

    def device_of(self, prompt_id: str) -> int | None:
        """The device a queued, running or finished prompt is bound to; ``None`` while it waits in the pool (or
        when it is unknown)."""
        with self.mutex:
            for q in self.devices:
                if prompt_id in q.running_prompt_ids() or any(item[1] == prompt_id for item in q.queue):
                    return q.index
            entry = self.history_store.entries.get(prompt_id)
            gpu_id = entry.get("gpu_id") if isinstance(entry, dict) else None
            return gpu_id if isinstance(gpu_id, int) else None

    # -- shutdown ---------------------------------------------------------------------------------------------
    def hold(self) -> None:
        """No queued prompt starts from now on; running ones go on."""
        with self.mutex:
            for q in self.devices:
                q.held = True
                q.not_empty.notify_all()

    def parked(self) -> bool:
        """Nothing runs and every worker waits in ``get`` (after ``hold``: each has finished its housekeeping)."""
        with self.mutex:
            return all(q.parked and not q.currently_running for q in self.devices)

    def cut_off(self) -> list[tuple[int, tuple]]:
        """Take the running prompts away from their workers: their results will be dropped, not recorded."""
        with self.mutex:
            running = [(q.index, copy.deepcopy(item)) for q in self.devices for item in q.currently_running.values()]
            for q in self.devices:
                q.closed = True
        return running

    def queued_items(self) -> list[tuple[int | None, tuple]]:
        """Every queued prompt with its device's index, ``None`` for those waiting in the pool."""
        with self.mutex:
            items: list[tuple[int | None, tuple]] = [(q.index, copy.deepcopy(item)) for q in self.devices
                                                     for item in sorted(q.queue)]
            if self.pool is not None:
                items += [(None, copy.deepcopy(item)) for item in self.pool.items()]
            return items

    def fail_pooled(self, message: str) -> list[tuple[tuple, dict]]:
        """Record every pooled prompt in history as an error (it will never run); see ``DeviceQueue.fail_queued``."""
        with self.mutex:
            if self.pool is None:
                return []
            dropped = self.pool.clear()
            failed = [(p.item, shutdown_error(p.item, message)) for p in dropped]
            for item, error in failed:
                status = {"status_str": "error", "completed": False, "messages": [("execution_error", error)]}
                # No device ran it, so no device's listeners (metrics, status) hear of it.
                self.history_store.record(item[1], {"prompt": item[:5] + item[6:], "outputs": {}, "status": status,
                                                    "meta": {}, "gpu_id": None})
            if failed:
                self._on_change(None)
            return failed

    def device_running(self, prompt_id: str) -> int | None:
        """The device whose worker is running ``prompt_id`` now, if any."""
        with self.mutex:
            for q in self.devices:
                if prompt_id in q.running_prompt_ids():
                    return q.index
        return None
