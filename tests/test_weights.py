"""Units of the shared weight store and device views (plain torch; the 'meta' device stands in for a GPU)."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from comfy_parallel import weights
from comfy_parallel.settings import parse_bytes
from comfy_parallel.weights import FileKey, WeightStore, make_view


def _host() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    m.register_buffer("scale", torch.ones(1))
    return m


def _ptrs(m: torch.nn.Module) -> list[int]:
    return [p.data_ptr() for p in m.parameters()]


def test_parse_bytes() -> None:
    assert parse_bytes("48G") == 48 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1.5k") == 1536
    assert parse_bytes("0") == 0 and parse_bytes("1024") == 1024
    for bad in ("", "lots", "-1G", "G"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_file_key_changes_when_the_file_is_replaced(tmp_path: Path) -> None:
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"x" * 10)
    link = tmp_path / "link.safetensors"
    link.symlink_to(f)
    assert FileKey.of(f) == FileKey.of(link)  # same file under two names: one key
    before = FileKey.of(f)
    f.write_bytes(b"y" * 11)
    os.utime(f, ns=(before.mtime_ns + 10**9, before.mtime_ns + 10**9))
    assert FileKey.of(f) != before


def test_view_shares_host_tensors_and_comes_back_without_copying() -> None:
    host = _host()
    weights.seal_host_modules([host])
    view = make_view(host, [host])
    assert view is not host and _ptrs(view) == _ptrs(host)
    assert all(pv is not ph for pv, ph in zip(view.parameters(), host.parameters()))
    view.to("meta")  # "load to the device": the view's parameters move, the host's do not
    assert all(p.device.type == "meta" for p in view.parameters())
    assert all(p.device.type == "cpu" for p in host.parameters())
    view.to("cpu")  # a meta tensor cannot be copied to the CPU: this only works by pointing back at the host
    assert _ptrs(view) == _ptrs(host)


def test_view_still_converts_what_is_not_where_asked() -> None:
    """A module whose tensors are all in place skips torch's _apply; anything else must still be converted."""
    host = _host()
    weights.seal_host_modules([host])
    view = make_view(host, [host])
    view.to("cpu")  # already there: nothing changes
    assert _ptrs(view) == _ptrs(host)
    view.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in view.parameters()) and view.scale.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in host.parameters()) and host.scale.dtype == torch.float32
    view.to(torch.float32)  # a dtype round trip on one device keeps the view's converted copy, equal to the host
    assert all(torch.equal(pv, ph) for pv, ph in zip(view.parameters(), host.parameters()))
    assert set(_ptrs(view)).isdisjoint(_ptrs(host))


def test_view_keeps_a_patched_weight_and_reclaims_a_restored_one() -> None:
    host = _host()
    view = make_view(host, [host])
    view.to("meta")
    patched = torch.nn.Parameter(torch.full((8, 8), 3.0), requires_grad=False)
    view[0].weight = patched  # like ComfyUI's set_attr_param for a LoRA result
    view[2].weight = torch.nn.Parameter(host[2].weight.data, requires_grad=False)  # like restoring a backup
    view[0].bias = torch.nn.Parameter(torch.zeros(8), requires_grad=False)
    view[0].bias.data = host[0].bias.data
    view.to("cpu")
    assert view[0].weight is patched and torch.all(view[0].weight == 3.0)
    assert view[2].weight.data_ptr() == host[2].weight.data_ptr()
    view.to("meta")
    assert view[2].weight.device.type == "meta"  # the reclaimed parameter moves with the view again


def test_views_do_not_share_parameters() -> None:
    host = _host()
    a, b = make_view(host, [host]), make_view(host, [host])
    a.to("meta")
    assert all(p.device.type == "cpu" for p in b.parameters())


def test_evicted_host_is_not_kept_alive_by_a_loaded_view() -> None:
    host = _host()
    view = make_view(host, [host])
    view.to("meta")
    refs = [ref for m in view.modules() for ref in m.__dict__.get("_cp_host", {}).values()]
    assert refs and all(r() is not None for r in refs)
    del host
    gc.collect()
    assert all(r() is None for r in refs)
    with pytest.raises(NotImplementedError):
        view.to("cpu")  # no host any more: ComfyUI's own copy back applies (and meta has nothing to copy)


def test_sealed_host_tensors_are_known() -> None:
    host = _host()
    assert not weights.is_host_tensor(host[0].weight)
    size = weights.seal_host_modules([host])
    assert size == sum(t.untyped_storage().nbytes() for t in weights.module_tensors(host))
    assert weights.is_host_tensor(host[0].weight) and weights.is_host_tensor(host[0].weight.data)
    assert not weights.is_host_tensor(host[0].weight.clone())


def _entry(store: WeightStore, key: str, loads: list[str], size: int = 64) -> weights.Entry:
    def load() -> torch.nn.Module:
        loads.append(key)
        time.sleep(0.05)
        return torch.nn.Linear(size, 1, bias=False)

    return store.get_or_load((key,), key, (), load, lambda m: [m])


def test_store_loads_each_key_once_even_when_asked_concurrently() -> None:
    store, loads = WeightStore(pin="off"), []
    got: list[weights.Entry] = []
    threads = [threading.Thread(target=lambda: got.append(_entry(store, "a", loads))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["a"] and len({id(e) for e in got}) == 1 and store.disk_loads == 1
    assert got[0].hits == 3


def test_store_evicts_least_recently_used_beyond_the_limit() -> None:
    store, loads = WeightStore(ram_limit=2 * 64 * 4, pin="off"), []
    _entry(store, "a", loads)
    _entry(store, "b", loads)
    _entry(store, "a", loads)  # a is now the most recently used
    _entry(store, "c", loads)  # over the limit: b goes
    assert [e.label for e in store.entries()] == ["a", "c"] and store.evictions == 1
    _entry(store, "b", loads)
    assert loads == ["a", "b", "c", "b"]


def test_unshareable_results_are_not_kept() -> None:
    store, loads = WeightStore(pin="off"), []
    for _ in range(2):
        entry = store.get_or_load(("x",), "x", (), lambda: loads.append("x") or object(), lambda r: None)
        assert not entry.shared
    assert loads == ["x", "x"] and store.entries() == []


def test_view_for_is_stable_per_device() -> None:
    store, loads = WeightStore(pin="off"), []
    entry = _entry(store, "a", loads)

    def make(host: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
        view = make_view(host, [host])
        return view, [view]

    v0, v0_again, v1 = store.view_for(entry, 0, make), store.view_for(entry, 0, make), store.view_for(entry, 1, make)
    assert v0 is v0_again and v0 is not v1
