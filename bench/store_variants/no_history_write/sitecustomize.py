"""bench/crash_safe_queue.py --variant no_history_write: workers write no history entry to SQLite (not crash-safe;
a measurement of what the worker's own statement costs the accept rate)."""

from comfy_parallel.scheduling import queues

queues.History.write = lambda self, prompt_id, entry, evicted: None  # type: ignore[method-assign]
