"""Per-device metrics: Prometheus text at ``GET /metrics`` and the seed's periodic log line.

The queues call :meth:`DeviceMetrics.on_start` when a worker takes a prompt and :meth:`DeviceMetrics.on_done`
when it finishes; gauges (queue length, running, loaded models) are read at scrape time, so they are never stale.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from ..scheduling.pool import PICK_REASONS
from ..scheduling.queues import is_oom, outcome_of
from .device_status import model_loads

if TYPE_CHECKING:
    from ..scheduling.queues import DeviceQueues

log = logging.getLogger("comfy_parallel.metrics")

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))
LOG_EVERY_TASKS = 10
LOG_EVERY_S = 60.0


@dataclass
class _Window:
    """What the periodic log line summarises since it was last written."""

    tasks: int = 0
    success: int = 0
    queue_sum: float = 0.0
    wait_sum: float = 0.0
    exec_sum: float = 0.0
    oom: int = 0
    since: float = field(default_factory=time.monotonic)


class DeviceMetrics:
    def __init__(self, queues: "DeviceQueues", loaded_models: Callable[[int], int],
                 labels: Iterable[str]) -> None:
        self.queues = queues
        self.loaded_models = loaded_models
        self.labels = list(labels)
        self.registry = CollectorRegistry(auto_describe=True)
        self.prompts = Counter("comfy_parallel_prompts", "Prompts finished, by outcome (success, error, interrupted)",
                               ["device", "outcome"], registry=self.registry)
        self.oom = Counter("comfy_parallel_oom", "CUDA out-of-memory errors inside prompts", ["device"],
                           registry=self.registry)
        self.restarts = Counter("comfy_parallel_worker_restarts", "Worker loop restarts (crash or executor rebuild)",
                                ["device", "reason"], registry=self.registry)
        self.wait = Histogram("comfy_parallel_queue_wait_seconds", "Time a prompt waited in its device queue",
                              ["device"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.execution = Histogram("comfy_parallel_execution_seconds", "Time a worker spent on a prompt",
                                   ["device"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.websocket_dropped = Counter(
            "comfy_parallel_websocket_dropped", "Websocket clients closed because they could not keep up with their "
            "messages (send_blocked: a send did not finish in time; backlog: a queued message waited too long)",
            ["reason"], registry=self.registry)
        for reason in ("send_blocked", "backlog"):
            self.websocket_dropped.labels(reason)
        self.websocket_clients: Callable[[], int] = lambda: 0  # set once ComfyUI's server exists
        self.graph_stats: Callable[[], dict] | None = None  # CUDA graph counts, set when graphs are on
        self.gc_stats: Callable[[], dict | None] = lambda: None  # the workers' full collections, set by the server
        self.clients_left = Counter("comfy_parallel_http_clients_left",
                                    "HTTP requests whose client closed the connection before they were answered",
                                    registry=self.registry)
        self.registry.register(_LiveCollector(self))
        self._lock = threading.Lock()
        self._windows = [_Window() for _ in self.labels]
        self._queue_at_start: dict[str, int] = {}
        for i in range(len(self.labels)):
            for outcome in ("success", "error", "interrupted"):
                self.prompts.labels(str(i), outcome)
            self.oom.labels(str(i))
            self.wait.labels(str(i))
            self.execution.labels(str(i))
            for reason in ("crash", "rebuild"):
                self.restarts.labels(str(i), reason)

    # -- queue listener ----------------------------------------------------------------------------------------
    def on_start(self, index: int, prompt_id: str, waited_s: float) -> None:
        self.wait.labels(str(index)).observe(waited_s)
        with self._lock:
            w = self._windows[index]
            w.wait_sum += waited_s
            w.queue_sum += len(self.queues.devices[index].queue)

    def on_done(self, index: int, prompt_id: str, status: dict | None, exec_s: float) -> None:
        device = str(index)
        outcome = outcome_of(status)
        self.prompts.labels(device, outcome).inc()
        self.execution.labels(device).observe(exec_s)
        oom = is_oom(status)
        if oom:
            self.oom.labels(device).inc()
        with self._lock:
            w = self._windows[index]
            w.tasks += 1
            w.success += outcome == "success"
            w.exec_sum += exec_s
            w.oom += oom
            due = w.tasks >= LOG_EVERY_TASKS or time.monotonic() - w.since >= LOG_EVERY_S
            if due:
                self._windows[index] = _Window()
        if due:
            log.info("[GPU %d] tasks=%d, success=%.1f%%, queue=%.1f, wait=%.0fms, exec=%.0fms, oom=%d", index,
                     w.tasks, 100.0 * w.success / w.tasks, w.queue_sum / w.tasks, 1000 * w.wait_sum / w.tasks,
                     1000 * w.exec_sum / w.tasks, w.oom)

    def on_oom_retry(self, index: int) -> None:
        self.oom.labels(str(index)).inc()

    def on_restart(self, index: int, reason: str) -> None:
        self.restarts.labels(str(index), reason).inc()

    def on_websocket_dropped(self, reason: str) -> None:
        self.websocket_dropped.labels(reason).inc()

    def on_client_left(self) -> None:
        self.clients_left.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Gauges read from the queues at scrape time."""

    def __init__(self, metrics: DeviceMetrics) -> None:
        self.metrics = metrics

    def collect(self):  # type: ignore[no-untyped-def]
        m = self.metrics
        queued = GaugeMetricFamily("comfy_parallel_queue_length", "Prompts waiting in the device queue",
                                   labels=["device"])
        running = GaugeMetricFamily("comfy_parallel_running", "Prompts running on the device (0 or 1)",
                                    labels=["device"])
        loaded = GaugeMetricFamily("comfy_parallel_loaded_models", "Models loaded on the device",
                                   labels=["device"])
        current = InfoMetricFamily("comfy_parallel_running_prompt", "The prompt running on the device",
                                   labels=["device"])
        for stats in m.queues.stats():
            device = str(stats.gpu_id)
            queued.add_metric([device], stats.queued)
            running.add_metric([device], stats.running)
            loaded.add_metric([device], m.loaded_models(stats.gpu_id))
            ids = m.queues.devices[stats.gpu_id].running_prompt_ids()
            current.add_metric([device], {"prompt_id": ids[0] if ids else "", "device_name": m.labels[stats.gpu_id]})
        yield from (queued, running, loaded, current)
        yield GaugeMetricFamily("comfy_parallel_websocket_clients", "Websocket clients connected",
                                value=m.websocket_clients())
        yield from self._loads()
        yield from self._pool()
        if m.graph_stats is not None:
            yield from _graph_families(m.graph_stats())
        yield from _gc_families(m.gc_stats())

    def _loads(self):  # type: ignore[no-untyped-def]
        loads = CounterMetricFamily("comfy_parallel_model_loads", "Models (or parts of them) ComfyUI loaded onto "
                                    "the device", labels=["device"])
        load_bytes = CounterMetricFamily("comfy_parallel_model_load_bytes", "Bytes of model weights ComfyUI loaded "
                                         "onto the device", labels=["device"])
        for i in range(len(self.metrics.labels)):
            counts = model_loads(i)
            loads.add_metric([str(i)], counts["model_loads"])
            load_bytes.add_metric([str(i)], counts["model_load_bytes"])
        yield from (loads, load_bytes)

    def _pool(self):  # type: ignore[no-untyped-def]
        stats = self.metrics.queues.pool_stats()
        if stats is None:
            return
        yield GaugeMetricFamily("comfy_parallel_pool_length", "Untargeted prompts waiting in the pool (not bound "
                                "to a device yet)", value=stats["length"])
        yield GaugeMetricFamily("comfy_parallel_pool_oldest_wait_seconds", "How long the oldest pooled prompt has "
                                "waited", value=stats["oldest_wait_s"])
        picks = CounterMetricFamily("comfy_parallel_pool_picks", "Pooled prompts a worker took, by why: the oldest, "
                                    "a younger one for affinity, or the oldest forced by --affinity-slack",
                                    labels=["device", "reason"])
        hits = CounterMetricFamily("comfy_parallel_affinity_hits", "Pooled prompts a worker took whose model files "
                                   "were all loaded on it (model) or whose nodes its executor cache answers (cache)",
                                   labels=["device", "kind"])
        for device in stats["devices"]:
            index = str(device["gpu_id"])
            for reason in PICK_REASONS:
                picks.add_metric([index, reason], device["picks"][reason])
            hits.add_metric([index, "model"], device["model_hits"])
            hits.add_metric([index, "cache"], device["cache_hits"])
        yield from (picks, hits)


def _gc_families(stats: dict | None) -> Iterable:
    """ComfyUI's periodic full garbage collections (comfy_adapter/garbage_collection.py): each holds the GIL, so
    every worker and the HTTP server wait while it runs."""
    if stats is None:
        return
    runs = CounterMetricFamily("comfy_parallel_gc_collections", "Full garbage collections ComfyUI's worker loop "
                               "asked for: run, or skipped because another worker ran one less than 10 s before",
                               labels=["result"])
    runs.add_metric(["run"], stats["runs"])
    runs.add_metric(["skipped"], stats["skipped"])
    yield runs
    yield CounterMetricFamily("comfy_parallel_gc_seconds", "Time the workers' full garbage collections took (every "
                              "thread of the process waits for the GIL meanwhile)", value=stats["seconds"])


def _graph_families(stats: dict) -> Iterable:
    """CUDA graph counts per worker (comfy_adapter/cuda_graphs.py): graph memory is bounded and visible."""
    graphs = GaugeMetricFamily("comfy_parallel_cuda_graphs", "CUDA graphs kept (each holds pool memory)",
                               labels=["device"])
    pools = GaugeMetricFamily("comfy_parallel_cuda_graph_pools", "CUDA graph memory pools", labels=["device"])
    steps = CounterMetricFamily("comfy_parallel_cuda_graph_steps", "UNet steps by path (replay of a graph, eager)",
                                labels=["device", "path"])
    captures = CounterMetricFamily("comfy_parallel_cuda_graph_captures", "CUDA graph captures by outcome",
                                   labels=["device", "outcome"])
    evictions = CounterMetricFamily("comfy_parallel_cuda_graph_evictions",
                                    "CUDA graphs dropped by the per-worker cap (least recently used)",
                                    labels=["device"])
    for worker, row in stats.get("per_worker", {}).items():
        if worker == "-1":
            continue  # steps outside a device worker (none in a multi-device server)
        graphs.add_metric([worker], row["graphs"])
        pools.add_metric([worker], row["pools"])
        steps.add_metric([worker, "replay"], row["replays"])
        steps.add_metric([worker, "eager"], row["eager"])
        captures.add_metric([worker, "captured"], row["captures"])
        captures.add_metric([worker, "failed"], row["failures"])
        evictions.add_metric([worker], row["evictions"])
    yield from (graphs, pools, steps, captures, evictions)
