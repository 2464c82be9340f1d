"""bench/crash_safe_queue.py --variant stdlib_json: the store encodes prompts and history entries with json, as
before it used orjson (durability/journal.py ``dumps``): what the faster encoder changes in the accept rate."""

from comfy_parallel.durability import journal

journal.orjson = None  # type: ignore[assignment]
