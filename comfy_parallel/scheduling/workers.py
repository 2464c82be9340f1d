"""One worker thread per device, each running ComfyUI's own ``prompt_worker`` loop on its device's queue.

Running ComfyUI's loop (rather than a copy of it) keeps each ComfyUI version's own executor set-up, history
bookkeeping and memory housekeeping. The thread binds its :class:`WorkerContext` first, so the adapter's
patches give that loop its own client id, progress registry, interrupt flag and model list, and it selects its
CUDA device, so ``comfy.model_management.get_torch_device()`` answers that device on this thread.

If the loop dies, the prompt it held is recorded in history as an error (never silently lost) and the loop is
started again with a fresh executor.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any, Callable, NamedTuple

from ..settings import DeviceSpec
from . import worker_context
from .queues import CONSECUTIVE_FAILURES_BEFORE_REBUILD, DeviceQueue, RebuildExecutor
from .worker_context import WorkerContext

log = logging.getLogger("comfy_parallel.workers")
PromptWorker = Callable[[Any, Any], None]


class Status(NamedTuple):
    """Same fields as ComfyUI's PromptQueue.ExecutionStatus."""

    status_str: str
    completed: bool
    messages: list


class DeviceWorker(threading.Thread):
    RESTART_DELAY_S = 1.0

    def __init__(self, spec: DeviceSpec, queue: DeviceQueue, prompt_server: Any, prompt_worker: PromptWorker,
                 on_restart: Callable[[int, str], None] = lambda index, reason: None) -> None:
        super().__init__(name=f"comfy-parallel-worker-{spec.index}", daemon=True)
        self.spec = spec
        self.queue = queue
        self.prompt_server = prompt_server
        self.prompt_worker = prompt_worker
        self.context = worker_context.get(spec.index) or WorkerContext(spec)
        self.restarts = 0
        self.warmup_s: float | None = None
        self.on_restart = on_restart
        self.ready = threading.Event()
        self.own_stream = False  # set when another worker uses the same GPU

    def _select_device(self) -> None:
        if self.spec.kind == "cuda":
            import torch

            torch.cuda.set_device(self.spec.ordinal)
            if self.own_stream:
                # Two workers on one GPU: on the legacy default stream their kernels serialise, and one worker's
                # launches would break the other's CUDA graph capture. torch's current stream is per thread.
                torch.cuda.set_stream(torch.cuda.Stream(device=self.spec.ordinal))

    def _warm_up(self) -> float:
        """Create the CUDA context, the allocator's first blocks and the cuBLAS handle before the first prompt."""
        started = time.perf_counter()
        import torch

        device = torch.device("cuda", self.spec.ordinal) if self.spec.kind == "cuda" else torch.device("cpu")
        a = torch.randn(512, 512, device=device, dtype=torch.float16 if self.spec.kind == "cuda" else torch.float32)
        (a @ a).sum().item()
        if self.spec.kind == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    def run(self) -> None:
        worker_context.bind(self.context)
        self._select_device()
        try:
            self.warmup_s = self._warm_up()
            log.info("[GPU %d] worker started on %s; device warm-up %.0f ms", self.spec.index, self.spec.label,
                     1000 * self.warmup_s)
        except Exception as exc:  # a failed warm-up is logged; the first prompt will show the real error
            log.error("[GPU %d] device warm-up failed: %s: %s", self.spec.index, type(exc).__name__, exc)
        self.ready.set()
        while True:
            try:
                self.prompt_worker(self.queue, self.prompt_server)
                log.error("[GPU %d] prompt_worker returned; starting it again", self.spec.index)
            except RebuildExecutor:
                self.restarts += 1
                self.on_restart(self.spec.index, "rebuild")
                log.warning("[GPU %d] %d consecutive failures: rebuilding the executor", self.spec.index,
                            CONSECUTIVE_FAILURES_BEFORE_REBUILD)
            except BaseException as exc:  # a dying worker must never take its prompt with it
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                self.restarts += 1
                self.on_restart(self.spec.index, "crash")
                log.error("[GPU %d] worker crashed (%s: %s); restart %d\n%s", self.spec.index,
                          type(exc).__name__, exc, self.restarts, traceback.format_exc())
                self._fail_running(exc)
                time.sleep(self.RESTART_DELAY_S)

    def _fail_running(self, exc: BaseException) -> None:
        with self.queue.mutex:
            held = list(self.queue.currently_running.items())
        for item_id, item in held:
            message = f"worker on device {self.spec.index} crashed: {type(exc).__name__}: {exc}"
            # The fields of ComfyUI's own execution_error, so that clients show it as they show any error.
            error = {"prompt_id": item[1], "node_id": self.context.last_node_id, "node_type": None, "executed": [],
                     "exception_type": type(exc).__name__, "exception_message": message,
                     "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
                     "current_inputs": {}, "current_outputs": [], "timestamp": int(time.time() * 1000)}
            status = Status("error", False, [("execution_error", error)])
            self.queue.task_done(item_id, {"outputs": {}, "meta": {}}, status)
            self._tell_submitter(item, error)

    def _tell_submitter(self, item: tuple, error: dict) -> None:
        """The executor died before it could end the prompt: without this its client waits for it forever."""
        extra = item[3] if len(item) > 3 and isinstance(item[3], dict) else {}
        client_id = extra.get("client_id")
        if client_id is None or self.prompt_server is None:
            return
        self.prompt_server.send_sync("execution_error", error, client_id)
        self.prompt_server.send_sync("executing", {"node": None, "prompt_id": item[1]}, client_id)


def start_workers(specs: tuple[DeviceSpec, ...], queues: list[DeviceQueue], prompt_server: Any,
                  prompt_worker: PromptWorker, on_restart: Callable[[int, str], None],
                  timeout_s: float = 60.0) -> list[DeviceWorker]:
    workers = [DeviceWorker(spec, q, prompt_server, prompt_worker, on_restart) for spec, q in zip(specs, queues)]
    for w in workers:
        w.own_stream = w.spec.kind == "cuda" and sum(s.ordinal == w.spec.ordinal for s in specs) > 1
        w.start()
    for w in workers:
        w.ready.wait(timeout_s)
    return workers
