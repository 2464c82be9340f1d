"""Patch of ComfyUI's periodic full garbage collection (``main.prompt_worker``): one per interval for the whole
process, not one per worker.

ComfyUI's worker loop calls ``gc.collect()`` after a prompt once ``gc_collect_interval`` (10 s) has passed since its
own last call, and at once after a ``free_memory`` or ``unload_models`` request. With one process per GPU each
process collects its own heap. With N workers in one process each worker's call is a full collection of the same,
shared heap, and it holds the GIL all through: every other worker and the HTTP server wait. Measured with 3 CPU
workers on the 2-core VM (a heap of ComfyUI, torch and full history): ~350 ms per collection, 3 per 10 s; a
1,000-prompt round of the write-ahead queue benchmark that one lands in accepts prompts at half the rate
(``bench/results/crash_safe_queue_device.md``, run 10). With 8 GPUs that would be 8 collections per 10 s.

So the workers share one schedule: a worker's call collects only if no worker has begun a collection for
``INTERVAL_S``, or if the worker was just asked to free memory (``/free``: its queue's flags held ``free_memory``
or ``unload_models``), as each worker unloads its own models and must not leave their cyclic garbage to the next
periodic collection. Garbage without cycles is freed at once as always (reference counting); cyclic garbage waits
at most as long as in stock ComfyUI.
"""

from __future__ import annotations

import gc
import threading
import time
from types import ModuleType
from typing import Any, Callable

from ..scheduling import worker_context
from .base import Comfy, Patch, first_problem, uses
from .prompt_server import stock_prompt_worker

INTERVAL_S = 10.0  # ComfyUI's gc_collect_interval, a local of main.prompt_worker (0.3.75 to 0.38)


class SharedCollector:
    """Stands in for the ``gc`` module in ComfyUI's ``main``: ``collect`` shares one schedule between the workers,
    everything else is the ``gc`` module's own."""

    def __init__(self, collect: Callable[..., int] = gc.collect, clock: Callable[[], float] = time.monotonic) -> None:
        self._collect = collect
        self._clock = clock
        self._lock = threading.Lock()
        self._last_run: float | None = None  # when a worker last began a full collection
        self.runs = 0
        self.skipped = 0
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)

    def collect(self, generation: int = 2) -> int:
        """A full collection if none began in the last ``INTERVAL_S`` or this worker was asked to free memory
        (``DeviceQueue.get_flags`` sets ``collect_requested``); a call from any other thread, or for a younger
        generation, is passed on."""
        ctx = worker_context.current()
        requested = ctx is None or generation != 2 or ctx.collect_requested
        if ctx is not None:
            ctx.collect_requested = False
        now = self._clock()
        with self._lock:
            if not requested and self._last_run is not None and now - self._last_run < INTERVAL_S:
                self.skipped += 1
                return 0
            self._last_run = now
        return self.run(generation)

    def run(self, generation: int = 2) -> int:
        """Collect now, counted in ``stats``."""
        started = time.perf_counter()
        try:
            return self._collect(generation)
        finally:
            with self._lock:
                self.runs += 1
                self.seconds += time.perf_counter() - started

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"runs": self.runs, "skipped": self.skipped, "seconds": self.seconds}


_active: SharedCollector | None = None


def stats() -> dict[str, float] | None:
    """The workers' full collections so far (``/metrics``), or None when the patch is not applied."""
    return None if _active is None else _active.stats()


class GcOncePerInterval(Patch):
    name = "gc-once-per-interval"
    replaces = "main.gc (the gc module that main.prompt_worker calls collect on)"
    why = ("every worker ran ComfyUI's full gc.collect() every 10 s, each a pass over the one shared heap that holds "
           "the GIL (~350 ms with 3 CPU workers on a 2-core host): N workers stalled the process N times as often "
           "as one ComfyUI per GPU. The workers now share one collection per 10 s; a free_memory/unload_models "
           "request still collects at once")
    checked_on = ("0.3.75", "0.33.0")

    def check(self, comfy: Comfy) -> str | None:
        main: Any = comfy.main
        current = getattr(main, "gc", None)

        def gc_module() -> str | None:
            if current is gc or isinstance(current, SharedCollector):
                return None
            return f"main.gc is {current!r}, not the gc module"

        def interval() -> str | None:
            if INTERVAL_S in stock_prompt_worker(comfy).__code__.co_consts:
                return None
            return f"main.prompt_worker no longer collects every {INTERVAL_S:g} s (its gc_collect_interval)"

        return first_problem(
            gc_module, lambda: uses(stock_prompt_worker(comfy), "gc", "collect", "gc_collect_interval"), interval)

    def _apply(self, comfy: Comfy) -> None:
        global _active
        main: ModuleType = comfy.main
        if isinstance(getattr(main, "gc", None), SharedCollector):
            return
        _active = SharedCollector()
        self.log.replace(main, "gc", _active)

    def undo(self) -> None:
        global _active
        super().undo()
        _active = None
