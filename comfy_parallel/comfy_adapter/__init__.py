"""The one place that touches ComfyUI internals.

``load_comfyui`` imports a ComfyUI checkout as the launcher does; ``Adapter`` applies the patches in
``patches.py`` to the imported ComfyUI, checks every patch point first and fails with the full list of what does
not fit, and undoes everything on request. ``report`` tells ``comfy-parallel doctor`` what would apply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .base import AdapterError, Comfy, Patch
from .loader import load_comfyui, read_version
from .patches import CHECKED, ServerHooks, all_patches

__all__ = ["Adapter", "AdapterError", "Comfy", "PatchStatus", "gate", "load_comfyui", "read_version", "report",
           "CHECKED"]
log = logging.getLogger("comfy_parallel.adapter")

# The adapter is process-wide: ComfyUI's modules are.
_active: "Adapter | None" = None


@dataclass(frozen=True)
class PatchStatus:
    name: str
    replaces: str
    why: str
    checked_on: tuple[str, ...]
    problem: str | None


def report(comfy: Comfy, hooks: ServerHooks | None = None) -> list[PatchStatus]:
    """What each patch would do to this ComfyUI and whether it can; changes nothing."""
    return [PatchStatus(p.name, p.replaces, p.why, p.checked_on, p.check(comfy)) for p in all_patches(hooks)]


def gate(comfy: Comfy, statuses: list[PatchStatus], allow_unchecked: bool) -> str | None:
    """Why comfy-parallel must not patch this ComfyUI (every mismatch listed), or ``None`` when it may.

    Fails closed: a version outside ``CHECKED`` is refused unless the user asked for it and every check passes.
    """
    failed = [f"  - {s.name}: {s.problem}" for s in statuses if s.problem]
    unchecked = comfy.version not in CHECKED
    if not failed and (not unchecked or allow_unchecked):
        return None
    lines = []
    if unchecked:
        lines.append(f"ComfyUI {comfy.version} is not a version comfy-parallel was checked on "
                     f"({', '.join(CHECKED)}).")
    if failed:
        lines.append(f"These patches do not fit ComfyUI {comfy.version}:")
        lines += failed
    elif unchecked:
        lines.append("Every patch check passed; --allow-unchecked-comfyui (COMFY_PARALLEL_ALLOW_UNCHECKED_COMFYUI=1 "
                     "in drop-in mode) starts it anyway, at your own risk.")
    lines.append("Start with COMFY_MULTI_GPU_SCHED=0 for stock ComfyUI, or use a checked ComfyUI version.")
    return "\n".join(lines)


class Adapter:
    def __init__(self, comfy: Comfy, hooks: ServerHooks | None, allow_unchecked: bool = False) -> None:
        self.comfy = comfy
        self.patches: list[Patch] = all_patches(hooks)
        self.allow_unchecked = allow_unchecked

    def apply(self) -> "Adapter":
        """Apply every patch or none: all patch points are checked before the first change."""
        global _active
        if _active is not None:
            log.info("comfy-parallel patches are already applied; not applying twice")
            return _active
        statuses = [PatchStatus(p.name, p.replaces, p.why, p.checked_on, p.check(self.comfy)) for p in self.patches]
        refusal = gate(self.comfy, statuses, self.allow_unchecked)
        if refusal is not None:
            raise AdapterError(refusal)
        if self.comfy.version not in CHECKED:
            log.warning("comfy-parallel: ComfyUI %s is not among the checked versions (%s); every patch check "
                        "passed and --allow-unchecked-comfyui was given, so it runs in multi-device mode",
                        self.comfy.version, ", ".join(CHECKED))
        for patch in self.patches:
            patch.apply(self.comfy)
        _active = self
        return self

    def undo(self) -> None:
        global _active
        for patch in reversed(self.patches):
            patch.undo()
        if _active is self:
            _active = None

    @property
    def applied(self) -> list[str]:
        return [p.name for p in self.patches if p.applied]


def active() -> Adapter | None:
    return _active


def custom_node_dirs() -> list[str]:
    """Every custom_nodes folder ComfyUI loads from (its own and those of extra_model_paths)."""
    import folder_paths  # type: ignore[import-not-found]

    return list(folder_paths.get_folder_paths("custom_nodes"))
