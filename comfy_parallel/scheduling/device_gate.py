"""One gate per GPU: workers' GPU work holds it shared, a CUDA graph capture on that GPU holds it alone.

A capture records every kernel launched on its stream; while it runs, another thread on the same GPU must not
do what CUDA forbids during a capture (a device synchronize, a free that synchronizes, work on the legacy
stream). Measured with two workers on one H200: the other worker's text-encoder load synchronized during a
capture ("operation not permitted when stream is capturing"), and both its prompt and the capture failed. So a
worker holds its GPU's gate shared while it executes a prompt or moves weights, and a capture waits until no other
thread holds it. Workers on different GPUs never wait on each other. Plain Python: no torch, no ComfyUI.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class DeviceGate:
    """A shared/exclusive gate that the holder of a shared hold can also take alone (a worker's own capture)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holds: dict[int, int] = {}  # thread id -> depth of its shared holds
        self._capturer: int | None = None  # the thread capturing, or waiting to capture

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the GPU for ordinary work; a new hold waits while another thread captures or waits to."""
        me = threading.get_ident()
        with self._cond:
            if not self._holds.get(me):
                self._cond.wait_for(lambda: self._capturer is None or self._capturer == me)
            self._holds[me] = self._holds.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._holds[me] -= 1
                if not self._holds[me]:
                    del self._holds[me]
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Yield ``True`` once no other thread holds the GPU; ``False`` at once when another thread captures or
        waits to (two workers each waiting for the other's hold to end would never proceed: run eagerly then)."""
        me = threading.get_ident()
        with self._cond:
            if self._capturer is not None and self._capturer != me:
                acquired = False
            else:
                self._capturer = me
                self._cond.wait_for(lambda: all(thread == me for thread in self._holds))
                acquired = True
        try:
            yield acquired
        finally:
            if acquired:
                with self._cond:
                    self._capturer = None
                    self._cond.notify_all()


_gates: dict[int, DeviceGate] = {}
_gates_lock = threading.Lock()


def gate_of(ordinal: int | None) -> DeviceGate:
    """The gate of CUDA device ``ordinal`` (``None`` means device 0, as ``torch.device('cuda').index``)."""
    with _gates_lock:
        return _gates.setdefault(ordinal or 0, DeviceGate())
