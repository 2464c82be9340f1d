"""bench/gc_pauses.py puts this first on a server's PYTHONPATH: every garbage collection of the process, by
generation (count and seconds, from gc.callbacks), written every second to $GC_PAUSES_OUT as JSON. Only one
sitecustomize runs, so the files in $GC_PAUSES_ALSO (a path list: store variants) are run after it."""

import gc
import json
import os
import runpy
import threading
import time

_totals = {generation: [0, 0.0] for generation in range(3)}
_started = [0.0]


def _callback(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        total = _totals[info["generation"]]
        total[0] += 1
        total[1] += time.perf_counter() - _started[0]


def _write(path: str) -> None:
    while True:
        time.sleep(1)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_totals, f)
        os.replace(tmp, path)


gc.callbacks.append(_callback)
if os.environ.get("GC_PAUSES_OUT"):
    threading.Thread(target=_write, args=(os.environ["GC_PAUSES_OUT"],), name="gc-pauses", daemon=True).start()
for _extra in filter(None, os.environ.get("GC_PAUSES_ALSO", "").split(os.pathsep)):
    runpy.run_path(_extra)
