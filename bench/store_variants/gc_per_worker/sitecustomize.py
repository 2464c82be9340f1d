"""bench/crash_safe_queue.py --variant gc_per_worker: every worker's periodic gc.collect() runs, as before the
gc-once-per-interval patch (comfy_adapter/garbage_collection.py), still counted in /metrics: what sharing one
collection per 10 s between the workers changes in the accept rate."""

import time

from comfy_parallel.comfy_adapter import garbage_collection


def collect(self, generation=2):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    try:
        return self._collect(generation)
    finally:
        with self._lock:
            self.runs += 1
            self.seconds += time.perf_counter() - started


garbage_collection.SharedCollector.collect = collect  # type: ignore[method-assign]
