"""The pool (pool.py) and the device queues in pool mode, in plain Python: no server, no ComfyUI.

The properties the scheduler promises, over generated streams: no prompt is passed by more than ``slack`` younger
ones; a worker with no own work always gets a pooled prompt if there is one; a targeted prompt never waits behind a
younger pooled one; every prompt put in is taken exactly once.
"""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comfy_parallel.scheduling.pool import (FileResolver, ModelFile, Pool, Residency, Traits, model_names,
                                            node_signatures, traits_of)
from comfy_parallel.scheduling.queues import DeviceQueues
from comfy_parallel.server.routing import RequestRoute
from comfy_parallel.settings import (SettingsError, from_env, parse_affinity_slack, parse_default_route,
                                     parse_vram_limit)


def txt2img(ckpt: str, text: str, seed: int) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "model": ["4", 0], "positive": ["6", 0],
                                                   "latent_image": ["5", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
    }


def test_signatures_see_what_a_new_seed_leaves_cached() -> None:
    a1, _ = node_signatures(txt2img("a.safetensors", "a cat", 1))
    a2, derived2 = node_signatures(txt2img("a.safetensors", "a cat", 2))
    b1, _ = node_signatures(txt2img("a.safetensors", "a dog", 1))
    # same workflow, new seed: loader, text encode and empty latent are answered by the cache; sampler onward not
    assert len(a1 & a2) == 3 and len(derived2 & a1) == 1
    assert len(a1 & b1) == 2  # another text: only the loader and the empty latent
    renumbered = {str(int(k) + 100): {**v, "inputs": {n: ([str(int(x[0]) + 100), x[1]] if isinstance(x, list)
                                                          else x) for n, x in v["inputs"].items()}}
                  for k, v in txt2img("a.safetensors", "a cat", 1).items()}
    assert node_signatures(renumbered)[0] == a1  # node ids do not matter, as in ComfyUI's cache keys
    assert model_names(txt2img("sub/a.SAFETENSORS", "x.ckpt is not a model name in a text", 1)) == \
        ["sub/a.SAFETENSORS"]


def test_resolver_keeps_answers_for_a_while(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.safetensors").write_bytes(b"x" * 10)
    now = [0.0]
    asked: list[str] = []

    def find(name: str) -> str | None:
        asked.append(name)
        path = tmp_path / name
        return str(path) if path.exists() else None

    resolver = FileResolver(find, ttl_s=30, clock=lambda: now[0])
    assert resolver.resolve("a.safetensors") == ModelFile("a.safetensors", str(tmp_path / "a.safetensors"), 10)
    assert resolver.resolve("b.safetensors") is None
    assert resolver.resolve("a.safetensors") is not None and len(asked) == 2
    (tmp_path / "b.safetensors").write_bytes(b"y")
    now[0] = 31.0
    assert resolver.resolve("b.safetensors") == ModelFile("b.safetensors", str(tmp_path / "b.safetensors"), 1)
    item = (1, "p1", txt2img("a.safetensors", "t", 1), {"client_id": "c"}, ["9"])
    traits = traits_of(item, resolver)
    assert [f.name for f in traits.files] == ["a.safetensors"] and traits.client_id == "c"


def files(*names: str) -> tuple[ModelFile, ...]:
    return tuple(ModelFile(n, f"/m/{n}", 1000) for n in names)


def test_affinity_order_model_then_cache_then_age() -> None:
    loaded = {0: {"/m/a": 1.0, "/m/b": 0.2}, 1: {}}  # worker 0: all of a, b's text encoder (a fifth of b)
    pool = Pool(2, slack=8, residency=lambda i: Residency(loaded[i], frozenset({"/m/a", "/m/b"})))
    sig_x, sig_y = frozenset({1, 2, 3}), frozenset({7, 8})
    pool.started(0, Traits(files("a"), sig_x, frozenset({2}), "client-x"))
    pool.add((1, "old-b"), Traits(files("b"), frozenset(), frozenset(), "client-x"))
    pool.add((2, "a-other"), Traits(files("a"), sig_y, frozenset({8}), "client-y"))
    pool.add((3, "a-cached"), Traits(files("a"), sig_x, frozenset({2}), "client-y"))
    pool.add((4, "a-client"), Traits(files("a"), frozenset(), frozenset(), "client-x"))
    first = pool.take(0)
    assert first is not None and first.pooled.prompt_id == "a-cached" and first.reason == "affinity"
    assert first.model_hit and first.cache_hit
    # the worker's view follows what it runs: now its last prompt had no cached nodes to offer -> client match
    pool.start(0, "a-cached")
    pool.started(0, Traits(files("a"), frozenset(), frozenset(), "client-x"))
    assert pool.take(0).pooled.prompt_id == "a-client"
    assert pool.take(0).pooled.prompt_id == "a-other"
    # worker 1 holds nothing: the oldest
    pick = pool.take(1)
    assert pick.pooled.prompt_id == "old-b" and pick.reason == "oldest" and not pick.model_hit
    assert pick.missing_bytes == 1000 and pool.take(1) is None
    assert Pool.missing_bytes(Traits(files("b")), loaded[0]) == 800  # what a load of b onto worker 0 would move


def test_an_idle_worker_takes_the_model_no_other_worker_holds() -> None:
    """The H200 benchmark's stream a: worker 0 kept a VAE's worth of checkpoint a from earlier (a small share), and
    worker 1 has just taken an a prompt. Loading a again on worker 0 would make a second copy; c is held nowhere."""
    loaded = {0: {"/m/a": 0.03}, 1: {"/m/a": 0.03}}
    pool = Pool(2, slack=8, residency=lambda i: Residency(loaded[i], frozenset({"/m/a", "/m/c"})))
    pool.add((1, "a-1"), Traits(files("a")))
    pool.add((2, "a-2"), Traits(files("a")))
    pool.add((3, "c-1"), Traits(files("c")))
    pick = pool.take(1)
    assert pick is not None and pick.pooled.prompt_id == "a-1"
    pool.start(1, "a-1")
    pick = pool.take(0)
    assert pick is not None and pick.pooled.prompt_id == "c-1" and pick.reason == "affinity"
    # a model both workers hold (a fifth of it missing on each) still beats a model held nowhere
    loaded.update({0: {"/m/a": 0.8}, 1: {"/m/a": 0.8}})
    pool.add((4, "c-2"), Traits(files("c")))
    pick = pool.take(0)
    assert pick is not None and pick.pooled.prompt_id == "a-2"


def test_leaf_nodes_the_cache_would_answer_do_not_let_a_younger_prompt_pass() -> None:
    """Stream c: one model, long and short jobs. A short job's empty latent matches the worker's last prompt, a
    long one's does not, but an empty latent costs nothing to run: the older (long) prompt goes first. A text
    encode (a node reading another node's output) does count."""
    pool = Pool(1, slack=8)
    latent_short, latent_long, encode, encode_other = 11, 12, 21, 22
    pool.started(0, Traits(files("a"), frozenset({latent_short, encode}), frozenset({encode}), None))
    pool.add((1, "long"), Traits(files("a"), frozenset({latent_long, encode}), frozenset({encode}), None))
    pool.add((2, "short"), Traits(files("a"), frozenset({latent_short, encode}), frozenset({encode}), None))
    pool.add((3, "short-new-text"), Traits(files("a"), frozenset({latent_short, encode_other}),
                                           frozenset({encode_other}), None))
    assert [pool.take(0).pooled.prompt_id for _ in range(3)] == ["long", "short", "short-new-text"]


@settings(max_examples=300, deadline=None, database=None)
@given(slack=st.integers(0, 6), n_workers=st.integers(1, 4),
       stream=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans()), min_size=1, max_size=60))
def test_no_prompt_is_passed_more_than_slack_times(slack: int, n_workers: int,
                                                   stream: list[tuple[int, int, bool]]) -> None:
    """Arrivals (model, worker that asks next, whether the worker asks before the next arrival), adversarial
    residency: each worker holds the model of the last prompt it ran."""
    pool = Pool(n_workers, slack=slack)
    arrival: dict[str, int] = {}
    started: list[str] = []
    n = 0

    def take(worker: int) -> None:
        pick = pool.take(worker)
        assert pick is not None  # a worker with no own work gets a pooled prompt whenever there is one
        pool.start(worker, pick.pooled.prompt_id)
        started.append(pick.pooled.prompt_id)

    for model, worker, asks in stream:
        pid = f"p{n}"
        arrival[pid] = n
        pool.add((n, pid), Traits(files(f"model{model}"), frozenset({model}), frozenset({model}), None))
        n += 1
        if asks:
            take(worker % n_workers)
    while len(pool):
        take(len(started) % n_workers)
    assert sorted(started) == sorted(arrival)  # each taken exactly once
    for position, pid in enumerate(started):
        younger_before = sum(1 for other in started[:position] if arrival[other] > arrival[pid])
        assert younger_before <= slack, (pid, younger_before, started)
    assert pool.max_passed <= slack


def _item(n: int, ckpt: str = "none") -> tuple:
    return (n, f"p{n}", {"1": {"class_type": "X", "inputs": {"ckpt_name": ckpt, "n": n}}}, {}, ["1"], {})


def test_a_targeted_prompt_never_waits_behind_a_younger_pooled_one() -> None:
    route: list[RequestRoute | None] = [None]
    qs = DeviceQueues(2, lambda: route[0], "pool", slack=8)
    assert qs.put(_item(1)) is None
    route[0] = RequestRoute(0, "header")
    assert qs.put(_item(2)) == 0
    route[0] = None
    assert qs.put(_item(3)) is None
    order = []
    for _ in range(3):
        got = qs.devices[0].get(timeout=1)
        assert got is not None
        order.append(got[0][1])
    assert order == ["p1", "p2", "p3"]  # number order across the device's own queue and the pool
    route[0] = RequestRoute(None, "none")
    assert qs.put(_item(4)) is None and route[0].pooled and route[0].assigned is None


def test_a_parked_worker_wakes_for_a_pooled_prompt_and_the_cheapest_idle_one_is_woken() -> None:
    qs = DeviceQueues(3, lambda: None, "pool", slack=8)
    got: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, qs.devices[i].get(timeout=5)))
               for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while not all(q.parked for q in qs.devices) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert qs.pool is not None
    qs.pool.started(2, Traits((), frozenset({99}), frozenset({99}), "c"))  # worker 2 ran this client's prompt
    item = (1, "p1", {}, {"client_id": "c"}, [], {})
    qs.put(item)
    assert [q.wake_pending for q in qs.devices] == [False, False, True]  # the same client: worker 2
    threads[2].join(5)
    assert got[2][0][1] == "p1"
    qs.put(_item(2))
    qs.put(_item(3))
    for t in threads:
        t.join(5)
    assert sorted(got[i][0][1] for i in (0, 1)) == ["p2", "p3"]


def test_pool_settings() -> None:
    assert parse_default_route(" Pool ", 2) == "pool" and parse_default_route("auto", 2) == "auto"
    assert parse_default_route("1", 2) == 1
    with pytest.raises(SettingsError, match="'pool'"):
        parse_default_route("fifo", 2)
    assert parse_affinity_slack("0") == 0 and parse_affinity_slack(" 12 ") == 12
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(SettingsError, match="affinity-slack"):
            parse_affinity_slack(bad)
    assert parse_vram_limit("12G") == 12 << 30 and parse_vram_limit(None) is None and parse_vram_limit("off") is None
    with pytest.raises(SettingsError, match="worker-vram-limit"):
        parse_vram_limit("0")
    env = {"COMFY_PARALLEL_DEVICES": "cpu,cpu", "COMFY_PARALLEL_DEFAULT_ROUTE": "pool",
           "COMFY_PARALLEL_AFFINITY_SLACK": "3", "COMFY_PARALLEL_WORKER_VRAM_LIMIT": "10G"}
    dropin = from_env(env, cpu_mode=True)
    assert (dropin.default_route, dropin.affinity_slack, dropin.worker_vram_limit) == ("pool", 3, 10 << 30)
    assert from_env({"COMFY_PARALLEL_DEVICES": "cpu,cpu"}, cpu_mode=True).default_route == "pool"  # the default
    auto = from_env({"COMFY_PARALLEL_DEVICES": "cpu,cpu", "COMFY_PARALLEL_DEFAULT_ROUTE": "auto"}, cpu_mode=True)
    assert auto.default_route == "auto"


def test_vram_limit_answer() -> None:
    from comfy_parallel.comfy_adapter.model_management import capped_free_memory

    assert capped_free_memory(100 << 30, 12 << 30, 5 << 30) == 7 << 30  # the limit binds
    assert capped_free_memory(3 << 30, 12 << 30, 5 << 30) == 3 << 30  # the device is fuller than the limit
    assert capped_free_memory((100, 40), 60, 30) == (30, 30) and capped_free_memory(5, 10, 20) == 0
