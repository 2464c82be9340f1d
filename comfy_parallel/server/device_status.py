"""What the status page shows per device beyond queue counts: progress, recent errors, name, VRAM, models.

:class:`DeviceStatus` is a queue listener (the same ``on_start`` / ``on_done`` / ``on_oom_retry`` interface as
the metrics) that keeps the last few errors of each device. Progress is not pushed anywhere: it is read at
request time from the running worker's own ComfyUI progress registry (``WorkerContext.progress_registry``,
which the adapter already keeps per worker), so no ComfyUI object is wrapped for it.

Everything read from ComfyUI or torch here is read defensively (``getattr``, ``try``): a status request must
answer even while a worker is between prompts, has not started, or runs a ComfyUI version without the registry.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from ..scheduling import worker_context
from ..scheduling.queues import outcome_of
from ..settings import DeviceSpec

MAX_ERRORS = 5
CPU_NAME = "CPU worker"


def error_message(status: dict | None) -> tuple[str, dict] | None:
    """The error of a finished prompt as (message, extra fields), or ``None`` if it succeeded or was interrupted."""
    if status is None:
        return "the prompt ended without a status", {}
    if outcome_of(status) != "error":
        return None
    messages = list(status.get("messages") or [])
    extra: dict = {}
    message = None
    for event, data in messages:
        if not isinstance(data, dict):
            continue
        if event == "execution_error":
            message = str(data.get("exception_message", "")).strip() or message
            extra = {k: data.get(k) for k in ("exception_type", "node_id", "node_type") if data.get(k) is not None}
        elif event == "comfy_parallel_oom" and data.get("message"):
            message = str(data["message"])
    return message or f"prompt ended with status {status.get('status_str')!r}", extra


class DeviceStatus:
    """Queue listener: the last :data:`MAX_ERRORS` errors and the start time of the running prompt per device."""

    def __init__(self, n_devices: int, max_errors: int = MAX_ERRORS) -> None:
        self._lock = threading.Lock()
        self._errors: list[deque] = [deque(maxlen=max_errors) for _ in range(n_devices)]
        self._started: dict[tuple[int, str], float] = {}

    # -- queue listener ----------------------------------------------------------------------------------------
    def on_start(self, index: int, prompt_id: str, waited_s: float) -> None:
        with self._lock:
            self._started[(index, prompt_id)] = time.time()

    def on_done(self, index: int, prompt_id: str, status: dict | None, exec_s: float) -> None:
        with self._lock:
            self._started.pop((index, prompt_id), None)
        found = error_message(status)
        if found is not None:
            message, extra = found
            self._add_error(index, {"prompt_id": prompt_id, "time": time.time(), "message": message, **extra})

    def on_oom_retry(self, index: int) -> None:
        self._add_error(index, {"prompt_id": None, "time": time.time(),
                                "message": "out of memory: device freed, the prompt runs once more",
                                "exception_type": "OutOfMemoryError"})

    def _add_error(self, index: int, entry: dict) -> None:
        with self._lock:
            if 0 <= index < len(self._errors):
                self._errors[index].append(entry)

    # -- views -------------------------------------------------------------------------------------------------
    def last_errors(self, index: int) -> list[dict]:
        """Newest first."""
        with self._lock:
            return [dict(e) for e in reversed(self._errors[index])] if 0 <= index < len(self._errors) else []

    def progress(self, index: int, running_prompt_ids: list[str]) -> dict | None:
        """``{"prompt_id", "node", "node_type", "value", "max", "elapsed_s"}`` of the prompt running on the device."""
        if not running_prompt_ids:
            return None
        prompt_id = running_prompt_ids[0]
        with self._lock:
            started = self._started.get((index, prompt_id))
        out: dict[str, Any] = {"prompt_id": prompt_id, "node": None, "node_type": None, "value": None, "max": None,
                               "elapsed_s": round(time.time() - started, 3) if started is not None else None}
        ctx = worker_context.get(index)
        registry = getattr(ctx, "progress_registry", None)
        if registry is None or getattr(registry, "prompt_id", None) != prompt_id:
            return out  # the worker has taken the prompt but ComfyUI has not set up its registry yet
        node = _running_node(getattr(registry, "nodes", None))
        if node is None:
            return out
        node_id, state = node
        out.update(node=node_id, node_type=_class_type(getattr(registry, "dynprompt", None), node_id),
                   value=_number(state.get("value")), max=_number(state.get("max")))
        return out


def _running_node(nodes: Any) -> tuple[str, dict] | None:
    """The node the registry marks running (the last one if several), else the last one that reported at all."""
    if not isinstance(nodes, dict):
        return None
    for _ in range(3):  # the worker thread may add a node while we copy
        try:
            items = list(nodes.items())
            break
        except RuntimeError:
            continue
    else:
        return None
    running = [(k, v) for k, v in items if isinstance(v, dict) and _state_name(v.get("state")) == "running"]
    if running:
        return running[-1]
    active = [(k, v) for k, v in items if isinstance(v, dict) and _state_name(v.get("state")) != "pending"]
    return active[-1] if active else None


def _state_name(state: Any) -> str:
    return str(getattr(state, "value", state)).lower()


def _class_type(dynprompt: Any, node_id: str) -> str | None:
    try:
        return str(dynprompt.get_node(node_id)["class_type"])
    except Exception:
        return None


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if float(value).is_integer() else float(value)


# -- device facts, read at request time -------------------------------------------------------------------------
_names: dict[int, str] = {}


def device_name(spec: DeviceSpec) -> str:
    if spec.kind != "cuda":
        return CPU_NAME
    if spec.ordinal not in _names:
        try:
            import torch

            _names[spec.ordinal] = str(torch.cuda.get_device_name(spec.ordinal))
        except Exception:
            return spec.label
    return _names[spec.ordinal]


def vram(spec: DeviceSpec) -> dict:
    """Device-wide used/total (all processes, from the driver) and what this process's allocator reserved."""
    out: dict[str, int | None] = {"vram_used_bytes": None, "vram_total_bytes": None, "vram_reserved_bytes": None}
    if spec.kind != "cuda":
        return out
    try:
        import torch

        free, total = torch.cuda.mem_get_info(spec.ordinal)
        out["vram_used_bytes"] = int(total - free)
        out["vram_total_bytes"] = int(total)
        out["vram_reserved_bytes"] = int(torch.cuda.memory_reserved(spec.ordinal))
    except Exception:
        pass
    return out


def loaded_models(index: int) -> list[dict]:
    """Name and loaded size of each model in the worker's ComfyUI model list (``current_loaded_models``)."""
    ctx = worker_context.get(index)
    out = []
    for lm in list(getattr(ctx, "loaded_models", None) or []):
        try:
            patcher = lm.model
        except Exception:
            patcher = None
        if patcher is None:
            continue
        inner = getattr(patcher, "model", patcher)
        try:
            size = int(lm.model_loaded_memory())
        except Exception:
            size = None
        out.append({"name": type(inner).__name__, "loaded_bytes": size})
    return out


def model_loads(index: int) -> dict:
    """How many times, and how many bytes, ComfyUI loaded models onto the worker's device (``CountModelLoads``)."""
    ctx = worker_context.get(index)
    return {"model_loads": getattr(ctx, "model_loads", 0), "model_load_bytes": getattr(ctx, "model_load_bytes", 0)}
