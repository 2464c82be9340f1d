"""bench/crash_safe_queue.py --variant gather_0ms: the journal thread writes as soon as it wakes (as before 28af2f9)
instead of gathering for 50 ms: a wake-up, and its statements, for nearly every staged record under load."""

from comfy_parallel.durability import journal_writer

journal_writer.GATHER_S = 0.0
