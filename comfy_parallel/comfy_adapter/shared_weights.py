"""Patches that make ComfyUI's model loaders share one host copy per file across device workers.

Without them every worker's executor loads its own copy of each checkpoint (N disk reads, N host copies). With
them a loader call is answered from ``weights.WeightStore``: the first call reads the file into host memory (on
the CPU, whatever the calling worker's device), every device gets a view of that host copy with its own
``load_device``, and in-place weight updates never reach the host copy (they copy on write instead).
See ``comfy_parallel.weights.store`` for views; DESIGN.md section 4 for why one module cannot serve two GPUs.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import sys
import threading
from typing import Any, Callable

import torch

from ..scheduling import worker_context
from ..weights import store as weights
from ..weights.store import FileKey, WeightStore
from .base import (CHECKED, Comfy, Patch, accepts_keywords, first_problem, require_callables, require_modules,
                   require_parameters, require_signature)

log = logging.getLogger("comfy_parallel.adapter")


_host_loading = threading.local()


def host_loading() -> bool:
    """True while this thread builds a host copy (its modules must be created on the CPU)."""
    return getattr(_host_loading, "active", False)


def _load_on_host(load: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        _host_loading.active = True
        try:
            return load()
        finally:
            _host_loading.active = False

    return run


def device_key() -> Any:
    """Views are per worker (two CPU workers share a device but must not share a ModelPatcher's state)."""
    ctx = worker_context.current()
    return ctx.index if ctx is not None else ("thread", threading.get_ident())


# -- which objects of a loader result are models, and how a view is pointed at another device -------------------

_PATCHER_ATTRS = ("patcher", "control_model_wrapped")
_MODULE_ATTRS = ("first_stage_model", "cond_stage_model", "control_model", "model")


def _items(result: Any) -> list[Any]:
    return [r for r in (result if isinstance(result, tuple) else (result,)) if r is not None]


def _is_patcher(obj: Any) -> bool:
    mp = sys.modules.get("comfy.model_patcher")
    return mp is not None and isinstance(obj, mp.ModelPatcher)


def host_modules(result: Any) -> list[torch.nn.Module]:
    """The ``nn.Module`` trees a loader result holds (a ModelPatcher's model, a CLIP's or VAE's model...)."""
    found: dict[int, torch.nn.Module] = {}
    for item in _items(result):
        candidates = [item] + [getattr(item, a, None) for a in _PATCHER_ATTRS]
        for obj in candidates:
            if _is_patcher(obj):
                found.setdefault(id(obj.model), obj.model)
        for attr in _MODULE_ATTRS:
            mod = getattr(item, attr, None)
            if isinstance(mod, torch.nn.Module):
                found.setdefault(id(mod), mod)
    return list(found.values())


def shareable(result: Any) -> bool:
    """Only results whose every item we know how to view are shared; anything else loads per worker, as stock."""
    known = ("ModelPatcher", "CLIP", "VAE", "ControlNet", "ClipVisionModel")
    return all(type(item).__name__ in known or _is_patcher(item) for item in _items(result)) and bool(
        host_modules(result))


def _retarget(view: Any, host_device: torch.device, device: torch.device) -> None:
    """Point every ``load_device``/``device`` that named the loading thread's device at this worker's device."""
    for item in _items(view):
        for obj in [item] + [getattr(item, a, None) for a in _PATCHER_ATTRS]:
            if obj is None:
                continue
            # ModelPatcher/ControlNet: load_device; VAE: device; with --highvram/--gpu-only the offload device is a
            # GPU too, and must be this worker's, not the loading worker's
            for attr in ("load_device", "offload_device", "device"):
                if getattr(obj, attr, None) == host_device:
                    setattr(obj, attr, device)


def _copy_model_configs(modules: list[torch.nn.Module]) -> Callable[[dict[int, Any]], None]:
    """Copy the model config objects of ``modules`` (``BaseModel.model_config``) field by field.

    ComfyUI 0.33's config class (``supported_models_base.BASE``) answers every missing attribute with ``None``
    and a warning, so ``copy.deepcopy`` finds a ``__setstate__`` of ``None`` and fails ("'NoneType' object is
    not callable"); 0.3.75's has no such ``__getattr__``. The copy is what deepcopy would make of it.
    """
    def prepare(memo: dict[int, Any]) -> None:
        for module in modules:
            config = module.__dict__.get("model_config")
            if config is None or id(config) in memo or not hasattr(config, "__dict__"):
                continue
            clone = object.__new__(type(config))
            memo[id(config)] = clone
            clone.__dict__.update(copy.deepcopy(config.__dict__, memo))

    return prepare


def _own_reload_factories(view: Any) -> None:
    """Point a view's ``cached_patcher_init`` (ComfyUI 0.33+) at ComfyUI's own loader instead of the shared one.

    0.33's loaders record how to load the same file again, and ComfyUI calls that when it needs a patcher with
    weights of its own (``ModelPatcher.deepclone_multigpu``, a non-dynamic delegate). Through the shared loader
    it would get this worker's cached view back, whose module it already uses; ComfyUI's own loader gives the
    private copy that code expects.
    """
    for item in _items(view):
        for obj in [item] + [getattr(item, a, None) for a in _PATCHER_ATTRS]:
            init = getattr(obj, "cached_patcher_init", None)
            if isinstance(init, tuple) and init and isinstance(init[0], _Loader):
                obj.cached_patcher_init = (init[0].original, *init[1:])


def _shared_objects(result: Any) -> list[Any]:
    """Read-only objects every view may share as they are (tokenizers are large to copy and never written)."""
    return [item.tokenizer for item in _items(result) if getattr(item, "tokenizer", None) is not None]


class _Loader:
    """One shared loader: file identity -> host copy in the store -> this worker's view."""

    def __init__(self, store: WeightStore, mm: Any, name: str, original: Callable[..., Any],
                 files: Callable[..., tuple[str, ...]]) -> None:
        self.store, self.mm, self.name, self.original, self.files = store, mm, name, original, files

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Loader":
        """A loader is a function: copies of a model that name it as its factory name this one."""
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not all(_plain(a) for a in (*args, *kwargs.values())):
            return self.original(*args, **kwargs)  # e.g. a ControlNet loaded against a model: not a file's copy
        try:
            files = tuple(FileKey.of(p) for p in self.files(*args, **kwargs))
        except (OSError, TypeError, IndexError, KeyError):
            return self.original(*args, **kwargs)  # let ComfyUI raise its own error for a missing file
        key = (self.name, files, repr(args), repr(sorted(kwargs.items())))
        label = f"{self.name.rsplit('.', 1)[-1]}({', '.join(os.path.basename(f.path) for f in files)})"
        loading_device: list[Any] = []

        def load() -> Any:
            loading_device.append(self.mm.get_torch_device())
            return self.original(*args, **kwargs)

        entry = self.store.get_or_load(key, label, files, _load_on_host(load),
                                       lambda r: host_modules(r) if shareable(r) else None)
        if not entry.shared:
            return entry.host
        host_device = entry.meta.setdefault("host_device", loading_device[0] if loading_device else None)

        def make(host: Any) -> tuple[Any, list[torch.nn.Module]]:
            modules = host_modules(host)
            view = weights.make_view(host, modules, share=_shared_objects(host), prepare=_copy_model_configs(modules))
            _retarget(view, host_device, self.mm.get_torch_device())
            _own_reload_factories(view)
            return view, host_modules(view)

        return self.store.view_for(entry, device_key(), make)


def _plain(value: Any) -> bool:
    """Arguments that can be part of a cache key by value (paths, names, options, dtypes)."""
    if value is None or isinstance(value, (str, int, float, bool, torch.dtype, torch.device)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _arg(name: str, position: int) -> Callable[..., tuple[str, ...]]:
    def files(*args: Any, **kwargs: Any) -> tuple[str, ...]:
        value = kwargs[name] if name in kwargs else args[position]
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)

    return files


class SharedModelLoaders(Patch):
    name = "shared-model-loaders"
    replaces = ("comfy.sd.load_checkpoint_guess_config, comfy.sd.load_diffusion_model, comfy.sd.load_clip, "
                "comfy.controlnet.load_controlnet, nodes.VAELoader.load_vae, nodes.LoraLoader.load_lora")
    why = ("each worker's executor loaded its own copy of every model file (N disk reads, N host copies); now a "
           "file is read once into one host copy and each device gets a view of it with its own load_device")
    checked_on = CHECKED

    def __init__(self, store: WeightStore) -> None:
        super().__init__()
        self.store = store

    def check(self, comfy: Comfy) -> str | None:
        problem = require_modules("comfy.sd", "comfy.controlnet")
        if problem:
            return problem
        sd, controlnet = sys.modules["comfy.sd"], sys.modules["comfy.controlnet"]
        return first_problem(
            lambda: require_callables(sd, "load_checkpoint_guess_config", "load_diffusion_model", "load_clip"),
            lambda: require_callables(controlnet, "load_controlnet"),
            lambda: require_callables(comfy.nodes.VAELoader, "load_vae"),
            lambda: require_callables(comfy.nodes.LoraLoader, "load_lora"),
            lambda: None if "loaded_lora" in comfy.nodes.LoraLoader.__init__.__code__.co_names
            else "LoraLoader does not keep loaded_lora",
            # the file argument is read by name or position; the node methods are called with these
            lambda: require_parameters(sd.load_checkpoint_guess_config, "load_checkpoint_guess_config", "ckpt_path"),
            lambda: require_parameters(sd.load_diffusion_model, "load_diffusion_model", "unet_path"),
            lambda: require_parameters(sd.load_clip, "load_clip", "ckpt_paths"),
            lambda: require_parameters(controlnet.load_controlnet, "load_controlnet", "ckpt_path"),
            lambda: require_signature(comfy.nodes.VAELoader.load_vae, "VAELoader.load_vae", "self", "vae_name"),
            lambda: require_signature(comfy.nodes.LoraLoader.load_lora, "LoraLoader.load_lora", "self", "model",
                                      "clip", "lora_name", "strength_model", "strength_clip"),
            lambda: accepts_keywords(sys.modules["comfy.utils"].load_torch_file, "load_torch_file", "safe_load",
                                     "return_metadata"),
        )

    def _apply(self, comfy: Comfy) -> None:
        sd = sys.modules["comfy.sd"]
        controlnet = sys.modules["comfy.controlnet"]
        mm = comfy.model_management
        for module, attr, files in (
            (sd, "load_checkpoint_guess_config", _arg("ckpt_path", 0)),
            (sd, "load_diffusion_model", _arg("unet_path", 0)),
            (sd, "load_clip", _arg("ckpt_paths", 0)),
            (controlnet, "load_controlnet", _arg("ckpt_path", 0)),
        ):
            original = getattr(module, attr)
            loader = _Loader(self.store, mm, f"{module.__name__}.{attr}", original, files)
            self.log.replace_everywhere(module, attr, loader)
        self._patch_vae_loader(comfy)
        self._patch_lora_loader(comfy)

    def _patch_vae_loader(self, comfy: Comfy) -> None:
        import folder_paths  # type: ignore[import-not-found]

        cls = comfy.nodes.VAELoader
        original = cls.load_vae
        store, mm = self.store, comfy.model_management

        def vae_path(self_: Any, vae_name: str) -> tuple[str, ...]:
            # WARNING: mirrors VAELoader.load_vae's choice of folder (0.3.52-0.3.75); TAESD and pixel_space VAEs
            # are built from several files or none and stay per worker.
            import os

            if vae_name == "pixel_space" or vae_name in getattr(self_, "image_taes", ()):
                raise KeyError(vae_name)
            folder = "vae_approx" if os.path.splitext(vae_name)[0] in getattr(self_, "video_taes", ()) else "vae"
            path = folder_paths.get_full_path(folder, vae_name)
            if path is None:
                raise KeyError(vae_name)
            return (path,)

        def load_vae(self_: Any, vae_name: str) -> Any:
            bound = _Loader(store, mm, "nodes.VAELoader.load_vae", lambda n: original(self_, n),
                            lambda n: vae_path(self_, n))
            return bound(vae_name)

        self.log.replace(cls, "load_vae", load_vae)

    def _patch_lora_loader(self, comfy: Comfy) -> None:
        import comfy.utils as comfy_utils  # type: ignore[import-not-found]
        import folder_paths  # type: ignore[import-not-found]

        cls = comfy.nodes.LoraLoader
        original = cls.load_lora
        store = self.store

        # ComfyUI 0.33 passes a LoRA file's metadata on (load_lora_for_models(..., lora_metadata=) and a third field
        # of loaded_lora); 0.3.75 reads the tensors only.
        with_metadata = "lora_metadata" in inspect.signature(sys.modules["comfy.sd"].load_lora_for_models).parameters

        def load_lora(self_: Any, model: Any, clip: Any, lora_name: str, strength_model: float,
                      strength_clip: float) -> Any:
            path = folder_paths.get_full_path("loras", lora_name)
            if path is not None and not (strength_model == 0 and strength_clip == 0):
                files = (FileKey.of(path),)
                entry = store.get_or_load(("lora", files), f"lora({lora_name})", files,
                                          lambda: comfy_utils.load_torch_file(path, safe_load=True,
                                                                              return_metadata=True),
                                          lambda loaded: [weights.tensor_bag(loaded[0])], pin=False)
                tensors, metadata = entry.host
                # WARNING: LoraLoader keeps the last file it read in self.loaded_lora (0.3.75: (path, tensors);
                # 0.33: (path, tensors, metadata)); handing it the shared tensors makes it skip its own read. The
                # tensors are only read by load_lora_for_models.
                self_.loaded_lora = (path, tensors, metadata) if with_metadata else (path, tensors)
            return original(self_, model, clip, lora_name, strength_model, strength_clip)

        self.log.replace(cls, "load_lora", load_lora)


class HostLoadOnCpu(Patch):
    name = "host-load-on-cpu"
    replaces = "comfy.model_management.unet_inital_load_device, text_encoder_initial_device, load_models_gpu"
    why = ("with enough free VRAM ComfyUI builds a model directly on the loading thread's GPU (and loads a new CLIP "
           "there); a shared host copy must be built, and stay, on the CPU so that every device can copy from it")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        mm = comfy.model_management
        return first_problem(
            lambda: require_callables(mm, "unet_inital_load_device", "text_encoder_initial_device", "load_models_gpu"),
            lambda: require_parameters(mm.text_encoder_initial_device, "text_encoder_initial_device", "load_device",
                                       "offload_device"),
        )

    def _apply(self, comfy: Comfy) -> None:
        mm = comfy.model_management
        unet_original = mm.unet_inital_load_device
        te_original = mm.text_encoder_initial_device

        def unet_inital_load_device(*args: Any, **kwargs: Any) -> Any:
            return torch.device("cpu") if host_loading() else unet_original(*args, **kwargs)

        def text_encoder_initial_device(load_device: Any, offload_device: Any, *args: Any, **kwargs: Any) -> Any:
            if host_loading():
                return offload_device if getattr(offload_device, "type", None) == "cpu" else torch.device("cpu")
            return te_original(load_device, offload_device, *args, **kwargs)

        load_original = mm.load_models_gpu

        def load_models_gpu(*args: Any, **kwargs: Any) -> Any:
            return None if host_loading() else load_original(*args, **kwargs)

        self.log.replace_everywhere(mm, "load_models_gpu", load_models_gpu)
        self.log.replace_everywhere(mm, "unet_inital_load_device", unet_inital_load_device)
        self.log.replace_everywhere(mm, "text_encoder_initial_device", text_encoder_initial_device)


class ViewBulkLoad(Patch):
    name = "view-bulk-load"
    replaces = "comfy.model_patcher.ModelPatcher.load, partially_unload"
    why = ("a view's full load issued ~1,700 per-tensor copies at ~30-50 us of CPU each, after ComfyUI's walk "
           "over every module; it is now one copy of the view's range of the page-locked host buffer, issued "
           "before the walk, which then runs while the bytes move")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        problem = require_modules("comfy.model_patcher")
        if problem:
            return problem
        cls = sys.modules["comfy.model_patcher"].ModelPatcher
        return first_problem(
            lambda: require_callables(cls, "load", "partially_unload", "model_size"),
            lambda: require_parameters(cls.load, "ModelPatcher.load", "self", "device_to", "lowvram_model_memory",
                                       "force_patch_weights", "full_load"),
            lambda: require_parameters(cls.partially_unload, "ModelPatcher.partially_unload", "self", "device_to",
                                       "memory_to_free"),
        )

    def _apply(self, comfy: Comfy) -> None:
        cls = sys.modules["comfy.model_patcher"].ModelPatcher
        original_load = cls.load
        original_partially_unload = cls.partially_unload

        def load(self_: Any, device_to: Any = None, lowvram_model_memory: int = 0, force_patch_weights: bool = False,
                 full_load: bool = False, *args: Any, **kwargs: Any) -> Any:
            # Only a full load moves every parameter (ComfyUI ends it with model.to(device_to)). With weight
            # patches ComfyUI reads each host weight first (its backup and the LoRA's input): stock order then.
            if (full_load and not self_.patches and device_to is not None
                    and torch.device(device_to).type == "cuda"):
                weights.bulk_load_view(self_.model, device_to)
            return original_load(self_, device_to, lowvram_model_memory, force_patch_weights, full_load, *args,
                                 **kwargs)

        def partially_unload(self_: Any, device_to: Any, memory_to_free: int = 0, *args: Any, **kwargs: Any) -> Any:
            if not weights.bulk_resident(self_.model):
                return original_partially_unload(self_, device_to, memory_to_free, *args, **kwargs)
            # One device buffer is freed only whole: offload every module ComfyUI can (more than asked, never
            # less), then give what must stay on the device its own memory so that the buffer goes.
            freed = original_partially_unload(self_, device_to, max(memory_to_free, 2 * self_.model_size()), *args,
                                              **kwargs)
            weights.release_bulk(self_.model)
            return freed

        self.log.replace(cls, "load", load)
        self.log.replace(cls, "partially_unload", partially_unload)


class NoteStateDictSources(Patch):
    name = "note-state-dict-sources"
    replaces = "torch.nn.Module.load_state_dict (noting only while a shared host copy is built)"
    why = ("--host-copy page-cache points a host copy's tensors at the file's memory mapping they were copied "
           "from; which file tensor went into which module tensor is only known inside ComfyUI's loaders")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return require_parameters(torch.nn.Module.load_state_dict, "Module.load_state_dict", "self", "state_dict")

    def _apply(self, comfy: Comfy) -> None:
        original = torch.nn.Module.load_state_dict

        def load_state_dict(self_: torch.nn.Module, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
            weights.note_state_dict(self_, state_dict)
            return original(self_, state_dict, *args, **kwargs)

        self.log.replace(torch.nn.Module, "load_state_dict", load_state_dict)


class HostWeightsReadOnly(Patch):
    name = "host-weights-read-only"
    replaces = "comfy.utils.copy_to_param"
    why = ("in-place weight updates (weight_inplace_update, hook patches) would write the host copy every device "
           "shares; a parameter that is a host tensor gets a new tensor instead (copy on write)")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return require_modules("comfy.utils") or first_problem(
            lambda: require_callables(sys.modules["comfy.utils"], "copy_to_param", "set_attr_param", "get_attr"),
            lambda: require_signature(sys.modules["comfy.utils"].copy_to_param, "copy_to_param", "obj", "attr",
                                      "value"),
        )

    def _apply(self, comfy: Comfy) -> None:
        utils = sys.modules["comfy.utils"]
        original = utils.copy_to_param
        set_attr_param = utils.set_attr_param

        def copy_to_param(obj: Any, attr: str, value: torch.Tensor) -> None:
            prev = utils.get_attr(obj, attr)
            if isinstance(prev, torch.Tensor) and weights.is_host_tensor(prev.data):
                set_attr_param(obj, attr, value.to(device=prev.device, dtype=prev.dtype, copy=True))
                return
            original(obj, attr, value)

        self.log.replace_everywhere(utils, "copy_to_param", copy_to_param)


def shared_weight_patches(store: WeightStore) -> list[Patch]:
    patches: list[Patch] = [HostLoadOnCpu(), HostWeightsReadOnly(), ViewBulkLoad(), SharedModelLoaders(store)]
    if store.host_copy == "page-cache":
        patches.insert(0, NoteStateDictSources())
    return patches
