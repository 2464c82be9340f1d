"""bench/crash_safe_queue.py --variant no_gather: the journal writer's thread writes as soon as it wakes, never
gathering for GATHER_S first (measures what gathering saves the event loop)."""

from comfy_parallel.durability import journal_writer

journal_writer.GATHER_S = 0.0
