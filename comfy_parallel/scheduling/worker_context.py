"""Per-worker state that ComfyUI keeps in process globals.

ComfyUI assumes one worker thread: the client id of the running prompt, the node being executed, the progress
registry, the interrupt flag and the list of loaded models are process globals. The adapter patches redirect
each of them here, to the context of the worker thread that touches it. Threads that are not workers (the
HTTP event loop) get ``None`` and the patches fall back to ComfyUI's own globals.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..settings import DeviceSpec


@dataclass
class WorkerContext:
    spec: DeviceSpec
    client_id: str | None = None
    last_node_id: str | None = None
    last_prompt_id: str | None = None
    progress_registry: Any = None
    loaded_models: list = field(default_factory=list)
    allow_empty_cache: bool = False
    collect_requested: bool = False  # /free asked this worker to unload: its next gc.collect() runs
    model_loads: int = 0  # models (or parts of them) ComfyUI moved onto this worker's device
    model_load_bytes: int = 0
    _interrupt: threading.Event = field(default_factory=threading.Event)
    _start_clear_pending: bool = False

    @property
    def index(self) -> int:
        return self.spec.index

    def begin_prompt(self) -> None:
        """The worker took a prompt, which shows as running from now on: an interrupt sent before is dropped here,
        and ComfyUI's own clear as its executor starts the prompt (``execute``: ``interrupt_processing(False)``)
        is skipped once, so an interrupt sent in between (a client that saw the prompt running) is not lost."""
        self._interrupt.clear()
        self._start_clear_pending = True

    def take_start_clear(self) -> bool:
        """Whether this clear is the executor's start-of-prompt one that ``begin_prompt`` already did."""
        pending, self._start_clear_pending = self._start_clear_pending, False
        return pending

    def set_interrupt(self, value: bool) -> None:
        if value:
            self._interrupt.set()
        else:
            self._interrupt.clear()

    def interrupted(self) -> bool:
        return self._interrupt.is_set()


_local = threading.local()
_registry: dict[int, WorkerContext] = {}
_registry_lock = threading.Lock()


def bind(ctx: WorkerContext) -> None:
    """Make ``ctx`` the context of the calling thread and list it among all workers."""
    _local.ctx = ctx
    with _registry_lock:
        _registry[ctx.index] = ctx


def current() -> WorkerContext | None:
    return getattr(_local, "ctx", None)


def get(index: int) -> WorkerContext | None:
    with _registry_lock:
        return _registry.get(index)


def loaded_models(index: int) -> list:
    """A snapshot of ComfyUI's loaded-model list of worker ``index`` (empty before it starts)."""
    ctx = get(index)
    return list(ctx.loaded_models) if ctx is not None else []


def all_contexts() -> list[WorkerContext]:
    with _registry_lock:
        return [_registry[k] for k in sorted(_registry)]
