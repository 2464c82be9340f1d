"""CUDA graph patch pieces that need no GPU: the allocator guard and the per-device capture gate."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from comfy_parallel.comfy_adapter.cuda_graphs import allocator_problem, gate_of
from comfy_parallel.scheduling.device_gate import DeviceGate


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
    deadline = time.time() + 5
    while gate._capturer is None and time.time() < deadline:  # the capture is now waiting for "a"
        time.sleep(0.01)
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


def test_graphs_are_keyed_by_weight_placement_so_plain_and_lora_each_keep_theirs() -> None:
    """A LoRA patch puts new tensors in place of the UNet's weights and its un-patch puts the originals back
    (ComfyUI's set_attr_param): the plain placement's key comes back, so its graphs replay instead of recapturing."""
    from comfy_parallel.comfy_adapter import cuda_graphs as cg

    unet = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    cg.note_placement(unet)
    plain = unet.__dict__[cg._PLACEMENT]
    original = unet[0].weight
    unet[0].weight = torch.nn.Parameter(original.detach() + 1)  # the LoRA-patched weight: a new tensor
    cg.note_placement(unet)
    patched = unet.__dict__[cg._PLACEMENT]
    unet[0].weight = original  # un-patch
    cg.note_placement(unet)
    assert plain != patched and unet.__dict__[cg._PLACEMENT] == plain
    with torch.no_grad():
        unet[1].weight.mul_(2)  # values written in place: same placement, the graph reads them at replay
    cg.note_placement(unet)
    assert unet.__dict__[cg._PLACEMENT] == plain


def test_graph_cap_drops_the_least_recently_used_and_counts_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from collections import OrderedDict

    from comfy_parallel.comfy_adapter import cuda_graphs as cg

    stats = cg.GraphStats()
    stats.max_graphs = 2
    monkeypatch.setattr(cg, "STATS", stats)

    def graph() -> cg._Graph:
        entry = cg._Graph.__new__(cg._Graph)  # no CUDA here: the cache logic only needs the owner
        entry.worker = 3
        stats.add("graphs", 3)
        return entry

    graphs: OrderedDict = OrderedDict((("a", graph()), ("seen", cg._SEEN), ("b", graph())))
    graphs.move_to_end("a")  # "a" replayed last: "b" is now the least recently used graph
    graphs["c"] = graph()
    cg._evict(graphs)
    assert list(graphs) == ["seen", "a", "c"]
    assert stats.as_dict()["per_worker"]["3"] == {"replays": 0, "eager": 0, "captures": 0, "failures": 0,
                                                  "evictions": 1, "graphs": 2, "pools": 0}
    unet = torch.nn.Linear(2, 2)
    unet.__dict__[cg._GRAPHS] = graphs
    cg.drop_graphs(unet)  # weights left the GPU: every graph goes, nothing may be captured
    assert stats.as_dict()["graphs"] == 0 and unet.__dict__[cg._READY] is False
