"""Units of the shared weight store and device views (plain torch; the 'meta' device stands in for a GPU)."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from comfy_parallel.settings import parse_bytes
from comfy_parallel.weights import store as weights
from comfy_parallel.weights.store import FileKey, WeightStore, make_view


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


class _CountMoves(torch.overrides.TorchFunctionMode):
    """Counts tensors that ``Tensor.to`` really moved (not the ones it returned as they were)."""

    count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.to and out is not args[0] and args[0].numel():
            self.count += 1
        return out


def test_bulk_load_is_one_buffer_the_load_then_finds_in_place_and_a_release_frees() -> None:
    host = _host()
    weights.pack_modules([host])  # what pin_modules does before page-locking (no CUDA here)
    weights.seal_host_modules([host])
    view = make_view(host, [host])
    nbytes = weights.bulk_load_view(view, "meta", require_pinned=False)
    # from the first parameter to the end of the last (each 64-byte aligned); the buffer packed before them is left
    assert nbytes == 8 * 8 * 4 + 3 * 64 + 8 * 4 * 4 + 4 * 4
    assert all(p.device.type == "meta" for p in view.parameters()) and view.scale.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in host.parameters())
    assert weights.bulk_resident(view)
    assert weights.bulk_load_view(view, "meta", require_pinned=False) == 0  # already there: not copied twice
    with _CountMoves() as moves:
        view.to("meta")  # ComfyUI's own Module.to afterwards: only the buffer is left to move
    assert moves.count == 1 and view.scale.device.type == "meta"
    assert weights.release_bulk(view) == 6 and not weights.bulk_resident(view)
    view.to("cpu")  # the unload points back at the host copy
    assert _ptrs(view) == _ptrs(host)


def test_bulk_load_leaves_a_view_with_a_patched_or_unpacked_weight_to_the_normal_path() -> None:
    host = _host()
    weights.pack_modules([host])
    view = make_view(host, [host])
    view[0].weight = torch.nn.Parameter(torch.full((8, 8), 3.0), requires_grad=False)  # a LoRA result
    assert weights.bulk_load_view(view, "meta", require_pinned=False) == 0
    assert all(p.device.type == "cpu" for p in view.parameters()) and not weights.bulk_resident(view)
    loose = _host()  # never packed: one storage per tensor
    assert weights.bulk_load_view(make_view(loose, [loose]), "meta", require_pinned=False) == 0
    assert weights.bulk_load_view(view, "meta") == 0  # not page-locked: one big copy would block the CPU


def _apply_fn(call: Callable[[torch.nn.Module], Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function torch's Module.to (or .half(), ...) hands to _apply."""
    seen: list = []

    class Spy(torch.nn.Module):
        def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
            seen.append(fn)
            return self

    call(Spy())
    return seen[0]


@pytest.mark.parametrize("call, expected, read_directly", [
    (lambda m: m.to("cpu"), True, True),
    (lambda m: m.to("cpu", torch.float32), True, True),
    (lambda m: m.to(torch.device("cpu"), dtype=torch.float64), False, True),
    (lambda m: m.to("meta"), False, False),  # no device index: ask the function
    (lambda m: m.to("cpu", memory_format=torch.channels_last), True, False),
    (lambda m: m.half(), False, False),
    (lambda m: m.float(), True, False),
])
def test_already_there_reads_module_to_like_asking_the_function(call: Callable, expected: bool,
                                                                read_directly: bool) -> None:
    m = torch.nn.Linear(2, 2)
    m.register_buffer("steps", torch.arange(3))  # not floating: Module.to(dtype) leaves it as it is
    fn = _apply_fn(call)
    spec = weights._module_to_target(fn)
    probes: dict = {}

    def target(dtype: torch.dtype) -> torch.Tensor:
        return probes.setdefault(dtype, fn(torch.empty(0, dtype=dtype)))

    assert weights._already_there(m, fn, target, None) is expected
    assert (spec is not None) is read_directly
    if spec is not None:  # the same answer without calling fn on every tensor
        assert weights._already_there(m, fn, target, spec) is expected


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


def test_sealed_host_tensors_are_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "_host_ptrs", set())  # addresses of earlier tests' freed host copies get reused
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


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_page_cache_host_copy_uses_the_files_pages_and_drops_them_between_uses(tmp_path: Path) -> None:
    """What --host-copy page-cache does with a module loaded the way ComfyUI loads one (safetensors,
    load_state_dict)."""
    import safetensors.torch
    from safetensors import safe_open

    torch.manual_seed(3)
    source = torch.nn.Sequential(torch.nn.Linear(2048, 4096), torch.nn.Linear(4096, 8))  # 32 MiB of weights
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with safe_open(str(path), framework="pt") as f:  # what comfy.utils.load_torch_file does
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd["1.weight"] = sd["1.weight"].double().float()  # a converted tensor: not the file's bytes, keeps its copy
    host = torch.nn.Sequential(torch.nn.Linear(2048, 4096), torch.nn.Linear(4096, 8))
    with weights.recording_state_dicts() as pairs:
        host.load_state_dict(sd)  # via the adapter's patch in the server; noted by hand here
        weights.note_state_dict(host, sd)
    del sd
    pages = weights.adopt_file_pages([host], pairs, [str(path)])
    assert pages.nbytes == (2048 * 4096 + 4096 + 8) * 4  # all but the converted weight
    in_file = [any(lo <= t.data_ptr() < hi for lo, hi in pages.ranges) for t in host.parameters()]
    assert in_file == [True, True, False, True]
    assert all(torch.equal(a, b) for a, b in zip(host.parameters(), source.parameters()))

    host[0].weight.sum()  # a use maps the pages again...
    before = _rss_file_kib()
    weights.release_file_pages(pages.ranges)
    assert before - _rss_file_kib() > 24 << 10  # ...and a release drops them from this process (KiB)
    assert all(torch.equal(a, b) for a, b in zip(host.parameters(), source.parameters()))  # still there

    # nothing is adopted where a module tensor already lies in the mapping (it could have been written there)
    with safe_open(str(path), framework="pt") as f:
        direct = torch.nn.Linear(2048, 4096)
        direct.weight = torch.nn.Parameter(f.get_tensor("0.weight"), requires_grad=False)
    assert weights.adopt_file_pages([direct], [(direct, {"weight": direct.weight})], [str(path)]).nbytes == 0
