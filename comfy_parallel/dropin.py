"""Drop-in mode: ComfyUI imported this package as a custom node; read the switches from the environment."""

from __future__ import annotations

import logging

from .activation import activate
from .comfy_adapter import AdapterError
from .settings import SettingsError, env_enabled, from_env

log = logging.getLogger("comfy_parallel")


def activate_from_env() -> None:
    if not env_enabled():
        log.info("comfy-parallel: loaded as a custom node; COMFY_MULTI_GPU_SCHED is not 1, so nothing is patched")
        return
    from comfy.cli_args import args  # type: ignore[import-not-found]

    # ComfyUI's loader logs and skips a custom node that raises an Exception; a half-started multi-device server
    # is worse than none, so configuration and version errors stop the process instead.
    try:
        activate(from_env(cpu_mode=bool(getattr(args, "cpu", False))))
    except (SettingsError, AdapterError) as err:
        log.critical("comfy-parallel: %s", err)
        raise SystemExit(f"comfy-parallel: {err}")
