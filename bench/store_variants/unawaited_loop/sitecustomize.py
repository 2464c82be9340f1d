"""bench/crash_safe_queue.py --variant unawaited_loop (NOT crash-safe, a measurement only): accepted prompts are
still written on the event loop in the next pass, but the POST answer does not wait for that commit. The gap to
the store as shipped is what the wait (two more loop passes per request) costs."""

import asyncio

from comfy_parallel.durability import journal_writer

_accept = journal_writer.JournalWriter.accept


def _accept_unawaited(self, route, item, place):  # type: ignore[no-untyped-def]
    _accept(self, route, item, place)
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


journal_writer.JournalWriter.accept = _accept_unawaited
