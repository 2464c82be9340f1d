"""Where a model file that a prompt names lies, looked up in ComfyUI's model folders (``folder_paths``).

The pool (pool.py) only knows a prompt's string inputs: ``"sd_xl_base_1.0.safetensors"`` is a model file if one of
ComfyUI's model folders (checkpoints, loras, vae, ... including extra_model_paths.yaml) holds it, whichever node
names it. The first folder in ComfyUI's own order that holds it wins.
"""

from __future__ import annotations

SKIPPED_FOLDERS = frozenset({"custom_nodes", "configs"})


def find_model_file(name: str) -> str | None:
    """The full path of model file ``name`` (a path relative to a model folder), or ``None``."""
    import folder_paths  # type: ignore[import-not-found]

    for folder in list(folder_paths.folder_names_and_paths):
        if folder in SKIPPED_FOLDERS:
            continue
        try:
            path = folder_paths.get_full_path(folder, name)
        except Exception:  # a folder some custom node registered oddly: not where a model is found
            continue
        if path is not None:
            return str(path)
    return None
