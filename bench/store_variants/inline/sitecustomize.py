"""bench/crash_safe_queue.py --variant inline: each accepted prompt is written by its own POST handler (one SQLite
statement per request, no batch), then queued, and the answer needs no further loop pass."""

import asyncio

from comfy_parallel.durability import journal_writer


def _accept_inline(self, route, item, place):  # type: ignore[no-untyped-def]
    done = asyncio.get_running_loop().create_future()
    self._accept([(route, item, place, done)])
    return done


journal_writer.JournalWriter.accept = _accept_inline
