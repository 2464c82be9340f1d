"""bench/crash_safe_queue.py --variant no_worker_writes (NOT crash-safe, a measurement only): the store as shipped,
but workers write neither a prompt's start nor its history entry. The gap to the store as shipped is what the
workers' two statements per prompt cost the accept rate."""

from comfy_parallel.durability import journal

journal.Journal.started = lambda self, prompt_id, device: None
journal.Journal.finished = lambda self, prompt_id, entry, evicted=(): None
