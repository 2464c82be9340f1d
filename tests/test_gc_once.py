"""gc-once-per-interval (comfy_adapter/garbage_collection.py): the workers share one full collection per 10 s.

The schedule is tested here with a clock the test moves; tests/test_adapter.py applies and undoes the patch on a
real ComfyUI, and tests/test_operations.py sees /free collect on every worker of a running server."""

from __future__ import annotations

import threading

from comfy_parallel.comfy_adapter.garbage_collection import INTERVAL_S, SharedCollector
from comfy_parallel.scheduling import worker_context
from comfy_parallel.settings import DeviceSpec


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_as_worker(index: int, func, *args):  # type: ignore[no-untyped-def]
    """Call ``func`` on a thread bound as device worker ``index``; return what it returned."""
    out = {}

    def body() -> None:
        ctx = worker_context.WorkerContext(DeviceSpec(index=index, kind="cpu"))
        worker_context.bind(ctx)
        out["ctx"] = ctx
        out["value"] = func(ctx, *args)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return out["value"]


def test_workers_share_one_collection_per_interval() -> None:
    calls: list[int] = []
    clock = Clock()
    shared = SharedCollector(collect=lambda generation=2: calls.append(generation) or 7, clock=clock)

    def collect(ctx, requested=False):  # type: ignore[no-untyped-def]
        ctx.collect_requested = requested
        return shared.collect(), ctx.collect_requested

    assert run_as_worker(0, collect) == (7, False)  # the first call collects
    clock.now += 1
    assert run_as_worker(1, collect) == (0, False)  # another worker's, 1 s later: skipped
    assert run_as_worker(2, collect, True) == (7, False)  # asked to free memory: collects, and the request is used
    clock.now += INTERVAL_S - 0.5
    assert run_as_worker(1, collect) == (0, False)  # 9.5 s after the last one began (the requested one)
    clock.now += 0.5
    assert run_as_worker(1, collect) == (7, False)  # 10 s: due
    assert shared.stats()["runs"] == 3 and shared.stats()["skipped"] == 2 and calls == [2, 2, 2]
    assert shared.collect() == 7  # not a worker (no context): passed on
    assert run_as_worker(0, lambda ctx: shared.collect(0)) == 7  # a young generation: passed on
    assert shared.isenabled() is True  # everything else is the gc module's
