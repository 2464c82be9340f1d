"""bench/crash_safe_queue.py --variant gc_per_worker: every worker's periodic gc.collect() runs, as before the
gc-once-per-interval patch (comfy_adapter/garbage_collection.py), still counted in /metrics: what sharing one
collection per 10 s between the workers changes in the accept rate."""

from comfy_parallel.comfy_adapter import garbage_collection

garbage_collection.SharedCollector.collect = garbage_collection.SharedCollector.run  # type: ignore[method-assign]
