"""bench/crash_safe_queue.py --variant write_through: no staging log, so every POST /prompt answer waits for the
SQLite commit that holds its prompt (one statement per event-loop pass): the store as it was before the staging
log, and what synchronous=FULL still does."""

from comfy_parallel.durability import recovery

_open_staging = recovery.open_staging


def _without_staging(journal, synchronous):  # type: ignore[no-untyped-def]
    staging = _open_staging(journal, synchronous)  # what an earlier run left is still applied
    if staging is not None:
        staging.close()
    return None


recovery.open_staging = _without_staging
