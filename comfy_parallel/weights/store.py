"""One host copy of each model file, shared by every device's worker (DESIGN.md section 4).

A loader result (a checkpoint's model, CLIP and VAE, a diffusion model, a ControlNet, a LoRA's tensors) is built
once, on the CPU, from one read of its file. Each device then gets a *view*: its own module tree whose
parameters start out as the very host tensors. ComfyUI loads a view to its GPU the usual way (``module.to``
gives the view's parameters new GPU tensors; the host tensors are untouched) and, when it unloads it, the view's
parameters are pointed back at the host tensors instead of being copied back to new CPU tensors.

This module is plain torch; which ComfyUI objects are views of what lives in ``comfy_adapter.shared_weights``.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import mmap
import os
import threading
import time
import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch

log = logging.getLogger("comfy_parallel.weights")


class FileKey(NamedTuple):
    """A file's identity: the same path with another size or mtime is another file (it was replaced)."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> "FileKey":
        real = os.path.realpath(path)
        st = os.stat(real)
        return cls(real, st.st_size, st.st_mtime_ns)


# -- host tensors ----------------------------------------------------------------------------------------------

# Storage addresses of every host copy ever made. Never pruned: a freed address that is reused only makes a later
# in-place update copy on write (harmless), while pruning early would let a write reach a copy views still share.
_host_ptrs: set[int] = set()


def is_host_tensor(t: torch.Tensor) -> bool:
    """True when ``t`` lives in a shared host copy, which nobody may write."""
    if t.device.type != "cpu" or not t.numel():
        return False
    return t.untyped_storage().data_ptr() in _host_ptrs


def module_tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    for m in module.modules():
        yield from (p for p in m._parameters.values() if p is not None)
        yield from (b for b in m._buffers.values() if b is not None)


def pack_modules(modules: list[torch.nn.Module]) -> torch.Tensor | None:
    """Move the modules' CPU tensors into one buffer, in module order (64-byte aligned); ``None``: nothing to pack.

    One buffer can be page-locked with one call and a model's tensors are then one contiguous range of it
    (what lets a view load as one copy, see :func:`bulk_load_view`).
    """
    slots: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
    seen: set[int] = set()
    for module in modules:
        for m in module.modules():
            for kind, table in ((True, m._parameters), (False, m._buffers)):
                for name, t in table.items():
                    if t is None or t.device.type != "cpu" or not t.numel() or id(t) in seen or t.is_pinned():
                        continue
                    seen.add(id(t))
                    slots.append((m, name, kind, t))
    sizes = [(t.numel() * t.element_size() + 63) // 64 * 64 for *_, t in slots]
    total = sum(sizes)
    if not total:
        return None
    flat = torch.empty(total, dtype=torch.uint8)
    offset = 0
    for (m, name, is_param, t), size in zip(slots, sizes):
        nbytes = t.numel() * t.element_size()
        packed = flat[offset:offset + nbytes].view(t.dtype).view(t.shape)
        packed.copy_(t)
        if is_param:
            t.data = packed
        else:
            m._buffers[name] = packed
        offset += size
    return flat


def pin_modules(modules: list[torch.nn.Module]) -> int:
    """Pack the modules' CPU tensors into one buffer registered as page-locked memory; bytes pinned (0: not).

    One exact-size buffer registered with ``cudaHostRegister`` (what ComfyUI itself uses for pinning), instead of
    ``Tensor.pin_memory()`` per tensor: torch's pinned allocator rounds every block up to a power of two, which
    measured ~1.9x the checkpoint's size in host RSS. The registration is undone when the buffer is freed.
    """
    flat = pack_modules(modules)
    if flat is None:
        return 0
    total = flat.numel()
    cudart = torch.cuda.cudart()
    ptr = flat.data_ptr()
    if cudart.cudaHostRegister(ptr, total, 0) != 0:
        log.warning("comfy-parallel: could not page-lock %.2f GiB of host weights; loads will be slower",
                    total / 2**30)
        return 0
    weakref.finalize(flat.untyped_storage(), cudart.cudaHostUnregister, ptr)
    return total


def seal_host_modules(modules: list[torch.nn.Module]) -> int:
    """Mark every CPU tensor of ``modules`` as a host copy (so nobody writes it); return their bytes."""
    total = 0
    seen: set[int] = set()
    for t in (t for module in modules for t in module_tensors(module)):
        if t.device.type != "cpu":
            continue
        ptr = t.untyped_storage().data_ptr()
        if t.numel():
            _host_ptrs.add(ptr)
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


# -- device views ----------------------------------------------------------------------------------------------

def _view_apply(self: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
    """``Module._apply`` for a view: a move back to the host points parameters at the host copy (no copy)."""
    host: dict[str, weakref.ref] = self.__dict__["_cp_host"]
    own: dict[str, torch.nn.Parameter] = self.__dict__["_cp_params"]
    probes: dict[torch.dtype, torch.Tensor] = {}

    def target(dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor where ``fn`` sends one of ``dtype``: asked once per dtype and call, not per tensor
        (each probe is a tensor conversion; a load runs this for thousands of parameters)."""
        probe = probes.get(dtype)
        if probe is None:
            probe = probes[dtype] = fn(torch.empty(0, dtype=dtype))
        return probe

    def lands_on_host(t: torch.Tensor, host_t: torch.Tensor) -> bool:
        probe = target(t.dtype)
        return probe.device == host_t.device and probe.dtype == host_t.dtype

    leaf = not self._modules
    spec = _module_to_target(fn)
    if leaf and _already_there(self, fn, target, spec):
        # Nothing to move (e.g. ComfyUI's Module.to after bulk_load_view, twice per module and load): the loops
        # below would change nothing but bookkeeping that the next real move redoes.
        return self
    for name, host_ref in host.items():
        param, host_param = self._parameters.get(name), host_ref()
        if param is None or host_param is None:
            continue  # the host copy was evicted: ComfyUI's own copy back to the CPU applies
        host_t = host_param.data
        if param is not own[name]:
            if param.data.untyped_storage().data_ptr() != host_t.untyped_storage().data_ptr():
                continue  # a patched weight (e.g. a LoRA result): not ours to drop
            own[name] = param  # ComfyUI restored the host tensor in a new Parameter: it is the view's own again
            continue
        if param.device != host_t.device and lands_on_host(param, host_t):
            own[name] = self._parameters[name] = torch.nn.Parameter(host_t, requires_grad=param.requires_grad)
        elif param.data.data_ptr() == host_t.data_ptr() and host_t.is_pinned():
            to = target(param.dtype)
            if to.device.type == "cuda" and to.dtype == param.dtype:
                # From page-locked, never-written memory the copy may run ahead of the CPU; later kernels on this
                # stream are ordered after it. torch's own .to() below then finds the tensor already there.
                param.data = host_t.to(to.device, non_blocking=True)
    for name, host_ref in self.__dict__["_cp_buffers"].items():
        buf, host_buf = self._buffers.get(name), host_ref()
        if buf is not None and host_buf is not None and buf.device != host_buf.device and lands_on_host(buf, host_buf):
            self._buffers[name] = host_buf
    if leaf and _already_there(self, fn, target, spec):
        return self  # what torch's _apply would do here: set every tensor to itself, ~40 us of Python per module
    ours = [name for name in own if self._parameters.get(name) is own[name]]
    result = torch.nn.Module._apply(self, fn, recurse)
    for name in ours:  # torch may replace a Parameter instead of setting .data (e.g. between device kinds)
        own[name] = self._parameters[name]
    return result


def _already_there(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
                   target: Callable[[torch.dtype], torch.Tensor],
                   spec: tuple[torch.device, torch.dtype | None] | None) -> bool:
    """Does ``fn`` return every parameter and buffer of ``module`` itself (not its children's) unchanged?

    For ``Module.to`` (``spec``, see :func:`_module_to_target`) that is a comparison of devices and dtypes. Any
    other ``fn`` is only asked about tensors already on its target device and dtype: for any other it would make
    a copy just to be told no, and torch's ``_apply`` would then make it again.
    """
    tensors = [t for table in (module._parameters, module._buffers) for t in table.values() if t is not None]
    if spec is not None:
        device, dtype = spec
        return all(t.device == device and (dtype is None or t.dtype == dtype
                                           or not (t.is_floating_point() or t.is_complex())) for t in tensors)
    with torch.no_grad():
        for t in tensors:
            probe = target(t.dtype)
            if probe.device != t.device or probe.dtype != t.dtype or fn(t) is not t:
                return False
    return True


_MODULE_TO_CONVERT = "Module.to.<locals>.convert"


def _module_to_target(fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.device, torch.dtype | None] | None:
    """``(device, dtype)`` when ``fn`` is the conversion torch's ``Module.to(device[, dtype])`` passes to ``_apply``.

    That function returns a tensor itself exactly when it is on ``device`` and, if floating or complex, of
    ``dtype``; knowing so saves calling it on every tensor of a load (ComfyUI moves each module twice per load).
    ``None`` (ask ``fn`` itself) for anything else: another torch version, a memory format, no device index.
    """
    if getattr(fn, "__qualname__", None) != _MODULE_TO_CONVERT:
        return None
    try:
        cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    except ValueError:  # an empty cell
        return None
    device, dtype = cells.get("device"), cells.get("dtype")
    if (set(cells) != {"convert_to_format", "device", "dtype", "non_blocking"} or cells["convert_to_format"] is not None
            or not isinstance(device, torch.device) or (device.type != "cpu" and device.index is None)
            or not (dtype is None or isinstance(dtype, torch.dtype))):
        return None
    return device, dtype


def module_view(host: torch.nn.Module, memo: dict[int, Any] | None = None) -> dict[int, Any]:
    """Seed a ``copy.deepcopy`` memo so that copying anything holding ``host`` yields a device view of it.

    Every parameter gets a new ``Parameter`` object over the same host tensor (``Module.to`` replaces a
    parameter's ``.data`` in place, so two views must never share one); buffers are shared as they are.
    After the deepcopy, call :func:`finish_view` on the copy.
    """
    memo = {} if memo is None else memo
    for t in module_tensors(host):
        if id(t) in memo:
            continue
        if isinstance(t, torch.nn.Parameter):
            memo[id(t)] = torch.nn.Parameter(t.data, requires_grad=t.requires_grad)
        else:
            memo[id(t)] = t
    return memo


def finish_view(host: torch.nn.Module, view: torch.nn.Module) -> None:
    """Give every module of a copied view the host-aware ``_apply``.

    The view knows its host parameters only weakly: the store's entry keeps them alive, and once the entry is
    evicted (``--weights-ram-limit``) a view that is loaded on its GPU no longer holds host memory.
    """
    slots: list[tuple[torch.nn.Module, str, weakref.ref]] = []
    for (name_h, mh), (name_v, mv) in zip(host.named_modules(), view.named_modules()):
        assert name_h == name_v, (name_h, name_v)
        refs = {name: weakref.ref(p) for name, p in mh._parameters.items()
                if p is not None and p.device.type == "cpu" and mv._parameters.get(name) is not None}
        buffers = {name: weakref.ref(b) for name, b in mh._buffers.items()
                   if b is not None and b.device.type == "cpu" and mv._buffers.get(name) is b}
        if not refs and not buffers:
            continue
        mv.__dict__["_cp_host"] = refs
        mv.__dict__["_cp_buffers"] = buffers
        mv.__dict__["_cp_params"] = {name: mv._parameters[name] for name in refs}
        mv.__dict__["_apply"] = types.MethodType(_view_apply, mv)
        slots.extend((mv, name, ref) for name, ref in refs.items())
    view.__dict__["_cp_slots"] = slots


def _untouched_host(module: torch.nn.Module, name: str, host_ref: weakref.ref) -> torch.nn.Parameter | None:
    """The host parameter behind a view's parameter while that parameter is still the view's own and points at
    it (not patched, not on a device); else ``None``."""
    param, host_param = module._parameters.get(name), host_ref()
    if (param is None or host_param is None or param is not module.__dict__["_cp_params"].get(name)
            or param.data_ptr() != host_param.data_ptr()):
        return None
    return host_param


def _bulk_slots(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor]] | None:
    """The view's parameters with their host tensors when every one of them is still the untouched host tensor
    (nothing patched, nothing already on a device) and all lie in one page-locked buffer; else ``None``."""
    slots: list[tuple[torch.nn.Module, str, weakref.ref]] = model.__dict__.get("_cp_slots", ())
    found: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    storage_ptr = None
    for module, name, host_ref in slots:
        host_param = _untouched_host(module, name, host_ref)
        if host_param is None:
            return None
        host_t = host_param.data
        ptr = host_t.untyped_storage().data_ptr()
        if storage_ptr is None:
            storage_ptr = ptr
        if ptr != storage_ptr or not host_t.is_contiguous():
            return None
        found.append((module, name, host_t))
    return found or None


class _Layout(NamedTuple):
    """Where a view's parameters lie in its host buffer (fixed for the host copy's life: it is never written)."""

    base_ptr: int  # the host buffer's address: a layout is stale once that buffer is gone
    lo: int
    hi: int
    pinned: bool
    # per slot: (offset from lo in elements of its dtype, dtype, shape, stride)
    slices: list[tuple[int, torch.dtype, torch.Size, tuple[int, ...]]]


def _layout(model: torch.nn.Module) -> _Layout | None:
    """The view's layout, worked out on its first bulk load; ``None`` while it cannot be loaded in bulk."""
    cached = model.__dict__.get("_cp_layout")
    if cached is not None:
        return cached or None
    found = _bulk_slots(model)
    if found is None:
        return None  # patched or partly on a device now: may well work next time
    base = found[0][2].untyped_storage()
    offsets = [t.data_ptr() - base.data_ptr() for _, _, t in found]
    sizes = [_nbytes(t) for _, _, t in found]
    lo, hi = min(offsets), max(o + n for o, n in zip(offsets, sizes))
    if hi - lo > 1.05 * sum(sizes) + 2**20:
        model.__dict__["_cp_layout"] = False  # the range holds another model's tensors too: never worth it
        return None
    if any((o - lo) % t.element_size() for o, (_, _, t) in zip(offsets, found)):
        model.__dict__["_cp_layout"] = False  # not packed by pack_modules (it aligns every tensor)
        return None
    layout = _Layout(base.data_ptr(), lo, hi, found[0][2].is_pinned(),
                     [((o - lo) // t.element_size(), t.dtype, t.shape, t.stride()) for o, (_, _, t) in
                      zip(offsets, found)])
    model.__dict__["_cp_layout"] = layout
    return layout


def bulk_load_view(model: torch.nn.Module, device: torch.device | str, require_pinned: bool = True) -> int:
    """Copy a whole view to ``device`` as one transfer; return the bytes copied (0: not possible, nothing done).

    Per-tensor copies cost ~30-50 us of CPU each (~1,700 for an SDXL UNet), so issuing them took as long as the
    transfer itself and ComfyUI's own per-module walk came on top. The host copy of a checkpoint is one packed
    page-locked buffer, so a view's parameters are one contiguous range of it: one asynchronous copy of that
    range into one device buffer, parameters pointed at their slices, and ComfyUI's walk then runs while the
    bytes move (its ``Module.to`` finds each parameter already there). Only for a full load: while the view is
    resident, ComfyUI's partial unloads must go through :func:`release_bulk` (one buffer is freed only whole).
    ``require_pinned``: from pageable memory the one copy would hold the CPU for its whole length (tests: False).
    """
    layout = _layout(model)
    if layout is None or (require_pinned and not layout.pinned):
        return 0
    slots: list[tuple[torch.nn.Module, str, weakref.ref]] = model.__dict__["_cp_slots"]
    first = slots[0][2]()
    if first is None or first.data.untyped_storage().data_ptr() != layout.base_ptr:
        model.__dict__.pop("_cp_layout", None)  # the host copy was evicted (or replaced)
        return 0
    if _untouched_host(*slots[0]) is None:
        return 0  # already on the device (a patch switch in place) or patched: nothing to copy in bulk
    size = layout.hi - layout.lo
    src = torch.empty(0, dtype=torch.uint8).set_(first.data.untyped_storage(), layout.lo, (size,))
    dev = torch.empty((size + 63) // 64 * 64, dtype=torch.uint8, device=device)  # any dtype can view it
    dev[:size].copy_(src, non_blocking=True)  # under way from here: the checks below run while the bytes move
    if any(_untouched_host(module, name, host_ref) is None for module, name, host_ref in slots):
        return 0  # something was patched or moved since: the stock order (dev is freed in stream order)
    typed: dict[torch.dtype, torch.Tensor] = {}
    for (module, name, _), (offset, dtype, shape, stride) in zip(slots, layout.slices):
        whole = typed.get(dtype)
        if whole is None:
            whole = typed[dtype] = dev.view(dtype)
        _set_param(module, name, whole.as_strided(shape, stride, offset))
    model.__dict__["_cp_bulk"] = (dev.data_ptr(), size)
    return size


def _in_bulk(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    """The view's parameters that are still slices of its bulk device buffer."""
    bulk = model.__dict__.get("_cp_bulk")
    if bulk is None:
        return
    start, size = bulk
    for module, name, _ in model.__dict__.get("_cp_slots", ()):
        param = module._parameters.get(name)
        if param is not None and param.device.type != "cpu" and start <= param.data_ptr() < start + size:
            yield module, name, param


def release_bulk(model: torch.nn.Module) -> int:
    """Give every parameter still in a view's bulk device buffer its own allocation; return how many moved.

    ComfyUI frees VRAM module by module (partial unloads), but one buffer is only freed when its last slice
    goes; whatever stays loaded must own its memory for the rest to be given back.
    """
    remaining = list(_in_bulk(model))
    model.__dict__.pop("_cp_bulk", None)
    for module, name, param in remaining:
        _set_param(module, name, param.data.clone())
    return len(remaining)


def bulk_resident(model: torch.nn.Module) -> bool:
    """Is any parameter of this view still a slice of its bulk device buffer?"""
    if next(_in_bulk(model), None) is not None:
        return True
    model.__dict__.pop("_cp_bulk", None)
    return False


def _set_param(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Point a view's parameter at ``value``, keeping the Parameter object where torch allows it."""
    param = module._parameters[name]
    if torch._has_compatible_shallow_copy_type(param, value):  # CPU <-> CUDA
        param.data = value
    else:  # what torch's own _apply does between incompatible kinds (the 'meta' device of the tests)
        module._parameters[name] = module.__dict__["_cp_params"][name] = torch.nn.Parameter(
            value, requires_grad=param.requires_grad)


def make_view(obj: Any, modules: Iterable[torch.nn.Module], share: Iterable[Any] = (),
              prepare: Callable[[dict[int, Any]], None] | None = None) -> Any:
    """Deep-copy ``obj`` (a loader result) into a device view of the host ``modules`` it holds.

    ``prepare`` may enter its own copies into the memo first, for objects ``copy.deepcopy`` cannot copy.
    """
    memo: dict[int, Any] = {}
    mods = list(modules)
    for m in mods:
        module_view(m, memo)
    for s in share:
        memo[id(s)] = s
    if prepare is not None:
        prepare(memo)
    view = copy.deepcopy(obj, memo)
    for m in mods:
        finish_view(m, memo[id(m)])
    return view


# -- host copies in the page cache (--host-copy page-cache) -------------------------------------------------------

_recording = threading.local()


@contextlib.contextmanager
def recording_state_dicts() -> Iterator[list[tuple[torch.nn.Module, dict]]]:
    """Note every state dict this thread loads into a module meanwhile (``note_state_dict``, called by the
    adapter's ``Module.load_state_dict``): which file tensor each module tensor was copied from."""
    previous = getattr(_recording, "pairs", None)
    _recording.pairs = pairs = []
    try:
        yield pairs
    finally:
        _recording.pairs = previous


def note_state_dict(module: torch.nn.Module, state_dict: Any) -> None:
    pairs = getattr(_recording, "pairs", None)
    if pairs is not None and hasattr(state_dict, "items"):
        pairs.append((module, dict(state_dict.items())))


def file_ranges(paths: Iterable[str]) -> list[tuple[int, int]]:
    """Address ranges where this process has these files mapped (``/proc/self/maps``; empty elsewhere)."""
    wanted = {os.path.realpath(p) for p in paths}
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges: list[tuple[int, int]] = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5] in wanted:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if ranges and ranges[-1][1] == start:  # one mapping the kernel lists in pieces
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
    return ranges


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class FilePages(NamedTuple):
    """The file mappings a page-cache host copy uses; holding ``storages`` keeps them mapped."""

    ranges: list[tuple[int, int]]
    storages: list[torch.UntypedStorage]
    nbytes: int


def adopt_file_pages(modules: list[torch.nn.Module], pairs: list[tuple[torch.nn.Module, dict]],
                     paths: Iterable[str]) -> FilePages:
    """Point host tensors at the identical bytes of their file's mapping; return what they now use.

    ComfyUI reads a .safetensors file through a private memory mapping and copies every tensor into the
    module's own memory. Where a module tensor equals, byte for byte, the mapped tensor it was loaded from, it
    can use the mapping instead: its own copy is freed, and the bytes live in the kernel's page cache, which
    this process drops from its RSS between uses (:func:`release_file_pages`) and maps again on the next use
    without reading the disk while the kernel keeps the file cached (it keeps it for stock ComfyUI too, which
    reads the same file the same way). Tensors ComfyUI converted (another dtype, a transposed or split
    weight) keep their own copy.
    """
    none = FilePages([], [], 0)
    ranges = file_ranges(paths)
    if not ranges:
        return none

    def in_file(ptr: int, nbytes: int) -> bool:
        return any(lo <= ptr and ptr + nbytes <= hi for lo, hi in ranges)

    # A module tensor that already lies in a mapping (ComfyUI used a file tensor as it was) may have been
    # written there; dropping the mapping's pages would undo that, so such a file is left as it is.
    if any(in_file(t.data_ptr(), 1) for root in modules for t in module_tensors(root) if t.device.type == "cpu"):
        return none
    owned = {id(m) for root in modules for m in root.modules()}
    candidates: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
    for module, state_dict in pairs:
        if id(module) not in owned:
            continue
        for key, value in state_dict.items():
            if (not isinstance(value, torch.Tensor) or value.device.type != "cpu" or not value.numel()
                    or not in_file(value.data_ptr(), _nbytes(value))):
                continue  # not in the file's mapping (e.g. a converted tensor, or a .ckpt read into memory)
            owner_name, _, attr = key.rpartition(".")
            try:
                owner = module.get_submodule(owner_name) if owner_name else module
            except AttributeError:
                continue
            is_param = attr in owner._parameters
            t = owner._parameters.get(attr) if is_param else owner._buffers.get(attr)
            if (t is not None and t.device.type == "cpu" and t.dtype == value.dtype and t.shape == value.shape
                    and t.stride() == value.stride()):
                candidates.append((owner, attr, is_param, value))
    if not candidates:
        return none
    # Only the mappings this load read (another loader may have the same file mapped for its own use).
    ranges = [(lo, hi) for lo, hi in ranges if any(lo <= v.data_ptr() < hi for *_, v in candidates)]
    # Dropping the pages first also reverts any page ComfyUI changed in place while converting: what is compared
    # below is the file's own content, as it will be read again after every release.
    release_file_pages(ranges)
    storages: dict[int, torch.UntypedStorage] = {}
    adopted = 0
    with torch.no_grad():
        for owner, attr, is_param, value in candidates:
            t = owner._parameters[attr] if is_param else owner._buffers[attr]
            if not torch.equal(t, value):
                continue
            if is_param:
                t.data = value
            else:
                owner._buffers[attr] = value
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage
            adopted += _nbytes(value)
    release_file_pages(ranges)  # the comparisons mapped every page again
    return FilePages(ranges, list(storages.values()), adopted) if adopted else none


_MADV_DONTNEED = 4


def release_file_pages(ranges: Iterable[tuple[int, int]]) -> None:
    """Drop file-mapped host copies from this process's memory (``madvise(MADV_DONTNEED)``); the bytes stay in
    the page cache and the next read maps them again. Only for private file mappings nobody writes, and only
    while something holds them mapped (a range given back to the system could be reused for other memory)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    for lo, hi in ranges:
        start, end = lo // page * page, -(-hi // page) * page
        if libc.madvise(start, end - start, _MADV_DONTNEED) != 0:
            log.debug("comfy-parallel: madvise failed (errno %d)", ctypes.get_errno())


# -- the store -------------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One loader result held on the host, and the device views handed out for it."""

    key: tuple
    label: str
    files: tuple[FileKey, ...]
    host: Any
    host_bytes: int
    pinned: bool
    views: dict[Any, Any] = field(default_factory=dict)
    view_modules: dict[Any, list[torch.nn.Module]] = field(default_factory=dict)
    shared: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    hits: int = 0
    file_pages: FilePages | None = None  # --host-copy page-cache: the file mappings the host copy uses


class WeightStore:
    """Loader results by file identity, each read once; an LRU bound on host bytes evicts unused ones."""

    def __init__(self, ram_limit: int | None = None, pin: str = "auto", host_copy: str = "ram") -> None:
        self.ram_limit = ram_limit
        self.pin = pin  # "auto" | "on" | "off"
        self.host_copy = host_copy  # "ram" | "page-cache"
        self._entries: "OrderedDict[tuple, Entry]" = OrderedDict()
        self._lock = threading.RLock()
        self._loading: dict[tuple, threading.Lock] = {}
        self.disk_loads = 0
        self.evictions = 0
        # The entries as of the last insert or eviction, readable without the lock (view_for holds it while it
        # copies a model, and the pool asks for residency under the queue lock; see residency)
        self.published: tuple[Entry, ...] = ()

    # Loading is serialised per key (a second worker waits for the first read instead of reading again) but
    # not across keys, so two GPUs can load two different checkpoints at once.
    def get_or_load(self, key: tuple, label: str, files: tuple[FileKey, ...], load: Callable[[], Any],
                    host_modules: Callable[[Any], list[torch.nn.Module] | None], pin: bool = True) -> Entry:
        """The entry for ``key``, loading it on first use. ``host_modules`` returns ``None`` for a result that
        cannot be shared: it is handed to this caller only and not kept."""
        entry = self._hit(key)
        if entry is not None:
            return entry
        with self._lock:
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            entry = self._hit(key)  # loaded by the caller we waited for
            if entry is not None:
                return entry
            started = time.monotonic()
            try:
                with recording_state_dicts() as pairs:
                    host = load()
                modules = host_modules(host)
                if modules is None:
                    return Entry(key, label, files, host, 0, False, shared=False)
                pages = None
                if self.host_copy == "page-cache":
                    pages = adopt_file_pages(modules, pairs, [f.path for f in files])
                    pinned = False  # page-locking would keep every page in this process's memory
                else:
                    pinned = pin and self._maybe_pin(modules)
                del pairs
                host_bytes = seal_host_modules(modules)
                trim_heap()  # the loader's temporary state dict and the unpacked tensors are gone
                in_page_cache = pages.nbytes if pages else 0
                entry = Entry(key, label, files, host, host_bytes, pinned, file_pages=pages if in_page_cache else None)
                with self._lock:
                    self._entries[key] = entry
                    self.disk_loads += 1
                    self._evict()
                    self.published = tuple(self._entries.values())
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            log.info("comfy-parallel: %s read once into host memory (%.2f GiB%s) in %.1f s", label,
                     host_bytes / 2**30, ", pinned" if pinned else
                     f", {in_page_cache / 2**30:.2f} GiB of it in the page cache" if in_page_cache else "",
                     time.monotonic() - started)
            return entry

    def _hit(self, key: tuple) -> Entry | None:
        """The cached entry for ``key``, counted and marked most recently used; ``None`` when not cached."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.hits += 1
                self._entries.move_to_end(key)
            return entry

    def _maybe_pin(self, modules: list[torch.nn.Module]) -> bool:
        if self.pin == "off" or not torch.cuda.is_available():
            return False
        size = sum(t.numel() * t.element_size() for m in modules for t in module_tensors(m))
        if self.pin == "auto":
            import psutil

            # Page-locked memory cannot be swapped out: pin only while pinned host copies stay under half the RAM.
            held = sum(e.host_bytes for e in self._entries.values() if e.pinned)
            if held + size > psutil.virtual_memory().total // 2:
                return False
        return pin_modules(modules) > 0

    def view_for(self, entry: Entry, device_key: Any, make: Callable[[Any], tuple[Any, list[torch.nn.Module]]]
                 ) -> Any:
        """The view of ``entry`` for one device, made on first use and then reused (same object, same VRAM)."""
        with self._lock:
            view = entry.views.get(device_key)
            if view is None:
                view, modules = make(entry.host)
                entry.views[device_key] = view
                entry.view_modules[device_key] = modules
            return view

    def _evict(self) -> None:
        """Drop least recently used entries beyond the limit, the new one too (its caller still holds it)."""
        if self.ram_limit is None:
            return
        while self._entries and sum(e.host_bytes for e in self._entries.values()) > self.ram_limit:
            _, entry = self._entries.popitem(last=False)
            self.evictions += 1
            log.info("comfy-parallel: evicted %s from host memory (%.2f GiB; --weights-ram-limit %.2f GiB); "
                     "devices that still use it keep it alive until they drop it", entry.label,
                     entry.host_bytes / 2**30, self.ram_limit / 2**30)

    def release_file_pages(self) -> None:
        """Drop every page-cache host copy's pages from this process's memory (between prompts)."""
        with self._lock:
            ranges = [r for e in self._entries.values() if e.file_pages for r in e.file_pages.ranges]
            release_file_pages(ranges)  # under the lock: an evicted entry's mapping may not go away meanwhile

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def host_bytes(self) -> int:
        with self._lock:
            return sum(e.host_bytes for e in self._entries.values())


def tensor_bag(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module holding a state dict's tensors as buffers, so a LoRA's tensors are counted and sealed like a model's."""
    bag = torch.nn.Module()
    for i, t in enumerate(tensors.values()):
        if isinstance(t, torch.Tensor):
            bag.register_buffer(f"t{i}", t, persistent=False)
    return bag


def _holds(loaded_models: list, modules: list[torch.nn.Module]) -> bool:
    ids = {id(m) for m in modules}
    for lm in list(loaded_models):
        patcher = getattr(lm, "model", None)
        if patcher is not None and id(getattr(patcher, "model", None)) in ids:
            return True
    return False


def residency(store: WeightStore | None, index: int, loaded_models: list) -> tuple[dict[str, float], frozenset[str]]:
    """(the share of each file's host copy that worker ``index`` has loaded on its device, every file the store holds).

    What the pool (pool.py) asks before it gives a worker a prompt: a prompt whose model files are loaded there
    costs no load. A file the store does not hold (a custom node's own loader, shared weights off) is not known.
    The share counts loaded bytes (ComfyUI's ``model_loaded_memory``) of the views' models against the host copy:
    a checkpoint whose text encoder stayed loaded while its UNet was unloaded is a small share, not loaded.
    """
    if store is None:
        return {}, frozenset()
    loaded: dict[str, float] = {}
    tracked: set[str] = set()
    for e in store.published:
        paths = [f.path for f in e.files]
        tracked.update(paths)
        modules = e.view_modules.get(index)
        if not modules:
            continue
        ids = {id(m) for m in modules}
        held = 0
        for lm in list(loaded_models):
            patcher = getattr(lm, "model", None)
            if patcher is not None and id(getattr(patcher, "model", None)) in ids:
                try:
                    held += int(lm.model_loaded_memory())
                except Exception:  # a dead entry ComfyUI will clean up
                    continue
        if held > 0:
            share = min(1.0, held / e.host_bytes) if e.host_bytes else 1.0
            for path in paths:
                loaded[path] = max(loaded.get(path, 0.0), share)
    return loaded, frozenset(tracked)


def status(store: WeightStore | None, loaded_models_of: Callable[[int], list]) -> dict:
    """``/multigpu/status``'s ``weights`` section: per host copy, its bytes, pinning and the devices holding it."""
    if store is None:
        return {"shared": False, "entries": []}
    entries = []
    for e in store.entries():
        devices = sorted(k for k, mods in list(e.view_modules.items())
                         if isinstance(k, int) and _holds(loaded_models_of(k), mods))
        entries.append({
            "name": e.label,
            "files": [f.path for f in e.files],
            "host_bytes": e.host_bytes,
            "page_cache_bytes": e.file_pages.nbytes if e.file_pages else 0,
            "pinned": e.pinned,
            "views": sorted(k for k in e.views if isinstance(k, int)),
            "devices_loaded": devices,
            "hits": e.hits,
        })
    return {"shared": True, "host_bytes": store.host_bytes(), "ram_limit": store.ram_limit, "pin": store.pin,
            "host_copy": store.host_copy,
            "disk_loads": store.disk_loads, "evictions": store.evictions, "entries": entries}


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc only; elsewhere a no-op).

    Loading a checkpoint allocates and frees gigabytes in many mid-sized blocks from several threads' malloc
    arenas; glibc keeps those pages, so without a trim a process that once loaded a model keeps its RSS peak.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class HeapTrimmer:
    """Queue listener: trim the heap after every prompt (loads and unloads happen inside prompts), and drop the
    pages of page-cache host copies that the prompt mapped."""

    def __init__(self, store: "WeightStore | None" = None) -> None:
        self.store = store

    def on_start(self, index: int, prompt_id: str, waited_s: float) -> None:
        pass

    def on_done(self, index: int, prompt_id: str, status: dict | None, exec_s: float) -> None:
        trim_heap()
        if self.store is not None and self.store.host_copy == "page-cache":
            self.store.release_file_pages()

    def on_oom_retry(self, index: int) -> None:
        pass
