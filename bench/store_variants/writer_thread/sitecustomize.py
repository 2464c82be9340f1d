"""bench/crash_safe_queue.py --variant writer_thread: accepted prompts are written by the journal writer's own
thread, also those the event loop hands over (the handler awaits the returned future either way)."""

from concurrent.futures import Future

from comfy_parallel.durability import journal_writer


def _accept_on_thread(self, route, item, place):  # type: ignore[no-untyped-def]
    future: Future = Future()
    with self.cond:
        self.pending.append((route, item, place, future))
        self.cond.notify_all()
    return future


journal_writer.JournalWriter.accept = _accept_on_thread
