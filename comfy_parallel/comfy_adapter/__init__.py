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

__all__ = ["Adapter", "AdapterError", "Comfy", "PatchStatus", "load_comfyui", "read_version", "report", "CHECKED"]
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


class Adapter:
    def __init__(self, comfy: Comfy, hooks: ServerHooks | None) -> None:
        self.comfy = comfy
        self.patches: list[Patch] = all_patches(hooks)

    def apply(self) -> "Adapter":
        """Apply every patch or none: all patch points are checked before the first change."""
        global _active
        if _active is not None:
            log.info("comfy-parallel patches are already applied; not applying twice")
            return _active
        problems = [(p.name, p.check(self.comfy)) for p in self.patches]
        failed = [f"  - {name}: {problem}" for name, problem in problems if problem]
        if failed:
            raise AdapterError(
                f"ComfyUI {self.comfy.version} does not offer what comfy-parallel patches (checked on "
                f"{', '.join(CHECKED)}); these patches do not apply:\n" + "\n".join(failed)
                + "\nStart with COMFY_MULTI_GPU_SCHED=0 for stock behaviour, or use a checked ComfyUI version.")
        if self.comfy.version not in CHECKED:
            log.warning("ComfyUI %s was not checked with comfy-parallel (checked: %s); every patch point was "
                        "found, continuing", self.comfy.version, ", ".join(CHECKED))
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
