"""bench/crash_safe_queue.py --variant unawaited_thread (NOT crash-safe, a measurement only): accepted prompts are
written by the journal writer's thread and the POST answer does not wait for it: the event loop does no store
work but hand-over. The gap to no store is what the other threads' writes (accepted, started, finished) cost the
loop; no design that writes SQLite can do better."""

import asyncio
from concurrent.futures import Future

from comfy_parallel.durability import journal_writer


def _accept_unawaited_thread(self, route, item, place):  # type: ignore[no-untyped-def]
    with self.cond:
        self.pending.append((route, item, place, Future()))
        self.cond.notify_all()
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


journal_writer.JournalWriter.accept = _accept_unawaited_thread
