"""CUDA graph patch pieces that need no GPU: the allocator guard and the per-device capture gate."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from comfy_parallel.comfy_adapter.cuda_graphs import allocator_problem, gate_of
from comfy_parallel.device_gate import DeviceGate


def test_capture_waits_for_running_unets_and_holds_new_ones_back() -> None:
    gate, events, running = DeviceGate(), [], threading.Event()

    def unet(name: str, hold: float) -> None:
        with gate.shared():
            events.append(f"{name} start")
            running.set()
            time.sleep(hold)
            events.append(f"{name} end")

    def capture() -> None:
        with gate.exclusive() as alone:
            assert alone
            events.append("capture start")
            time.sleep(0.2)
            events.append("capture end")

    first = threading.Thread(target=unet, args=("a", 0.3))
    first.start()
    running.wait(5)
    cap = threading.Thread(target=capture)
    cap.start()
    time.sleep(0.1)  # the capture is now waiting for "a"
    late = threading.Thread(target=unet, args=("b", 0.0))
    late.start()
    for t in (first, cap, late):
        t.join(5)
    assert events == ["a start", "a end", "capture start", "capture end", "b start", "b end"]


def test_gates_are_per_device() -> None:
    zero, one = gate_of(torch.device("cuda", 0)), gate_of(torch.device("cuda", 1))
    assert zero is gate_of(torch.device("cuda:0")) and zero is not one
    with zero.exclusive() as alone:
        assert alone
        done = threading.Event()

        def other_gpu() -> None:
            with one.shared():
                done.set()

        threading.Thread(target=other_gpu).start()
        assert done.wait(2), "a capture on GPU 0 held back a UNet on GPU 1"


@pytest.mark.parametrize("backend,concurrent,off", [("cudaMallocAsync", True, True), ("cudaMallocAsync", False, False),
                                                     ("native", True, False)])
def test_allocator_guard(monkeypatch, backend: str, concurrent: bool, off: bool) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: backend)
    problem = allocator_problem(concurrent=concurrent)
    assert (problem is not None) == off and (not off or "--disable-cuda-malloc" in problem)


def test_a_worker_captures_inside_its_own_prompt_while_the_other_workers_prompt_runs_eagerly() -> None:
    """Each worker holds its GPU for a whole prompt; both reach a capture at once: one captures once the other's
    prompt is over, the other runs that step eagerly at once (waiting for each other would never end)."""
    gate = DeviceGate()
    events: list[str] = []
    both_in_prompt = threading.Barrier(2)
    a_waits = threading.Event()

    def worker_a() -> None:
        with gate.shared():  # prompt
            both_in_prompt.wait()
            a_waits.set()
            with gate.exclusive() as alone:  # capture inside its own prompt: waits for b's prompt to end
                events.append(f"a capture {alone}")
                with gate.shared():  # its own UNet call during the capture does not wait
                    events.append("a unet in capture")

    def worker_b() -> None:
        with gate.shared():  # prompt
            both_in_prompt.wait()
            assert a_waits.wait(5)
            deadline = time.time() + 5
            while gate._capturer is None and time.time() < deadline:  # a's capture is now pending
                time.sleep(0.01)
            with gate.exclusive() as alone:
                events.append(f"b capture {alone}")
            with gate.shared():  # re-entrant: b already holds the GPU for its prompt
                events.append("b eager step")
        events.append("b prompt end")

    threads = [threading.Thread(target=worker_a), threading.Thread(target=worker_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "the two workers deadlocked"
    assert events == ["b capture False", "b eager step", "b prompt end", "a capture True", "a unet in capture"]
