"""bench/crash_safe_queue.py --variant gather_500ms: the journal thread gathers for 500 ms instead of 50 ms, so it
asks for the GIL (once per wake-up and once per SQLite statement) a tenth as often."""

from comfy_parallel.durability import journal_writer

journal_writer.GATHER_S = 0.5
