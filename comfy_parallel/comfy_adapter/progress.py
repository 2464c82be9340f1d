"""Patches of ``comfy_execution.progress``: each worker keeps its own progress registry and sends its progress
only to the client that submitted the prompt."""

from __future__ import annotations

from typing import Any

from ..scheduling import worker_context
from .base import CHECKED, Comfy, Patch, first_problem, require_callables, require_signature, uses


class ProgressRegistryPerWorker(Patch):
    name = "progress-registry-per-worker"
    replaces = "comfy_execution.progress.get_progress_state / reset_progress_state"
    why = "a prompt starting on one GPU reset the progress registry of a prompt running on another"
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        if comfy.progress is None:
            return "comfy_execution.progress is not imported"
        return first_problem(
            lambda: require_callables(comfy.progress, "get_progress_state", "reset_progress_state", "ProgressRegistry"),
            lambda: uses(comfy.progress.reset_progress_state, "global_progress_registry"),
            lambda: require_signature(comfy.progress.get_progress_state, "get_progress_state"),
            lambda: require_signature(comfy.progress.reset_progress_state, "reset_progress_state", "prompt_id",
                                      "dynprompt"),
            lambda: require_signature(comfy.progress.ProgressRegistry, "ProgressRegistry", "prompt_id", "dynprompt"),
        )

    def _apply(self, comfy: Comfy) -> None:
        progress = comfy.progress
        assert progress is not None
        original_get = progress.get_progress_state
        original_reset = progress.reset_progress_state

        def get_progress_state() -> Any:
            ctx = worker_context.current()
            if ctx is None:
                return original_get()
            if ctx.progress_registry is None:
                # WARNING: mirrors progress.get_progress_state's lazy default (0.3.52-0.3.75).
                from comfy_execution.graph import DynamicPrompt

                ctx.progress_registry = progress.ProgressRegistry(prompt_id="", dynprompt=DynamicPrompt({}))
            return ctx.progress_registry

        def reset_progress_state(prompt_id: str, dynprompt: Any) -> None:
            ctx = worker_context.current()
            if ctx is None:
                return original_reset(prompt_id, dynprompt)
            # WARNING: mirrors progress.reset_progress_state (0.3.52-0.3.75).
            if ctx.progress_registry is not None:
                ctx.progress_registry.reset_handlers()
            ctx.progress_registry = progress.ProgressRegistry(prompt_id, dynprompt)

        self.log.replace_everywhere(progress, "get_progress_state", get_progress_state)
        self.log.replace_everywhere(progress, "reset_progress_state", reset_progress_state)


class _SubmitterOnly:
    """Stands in for the server inside one progress-handler call: messages without a client go to the submitter."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def send_sync(self, event: Any, data: Any, sid: Any = None) -> None:
        self._server.send_sync(event, data, sid if sid is not None else self._server.client_id)


class ProgressStateToSubmitter(Patch):
    name = "progress-state-to-submitter"
    replaces = "comfy_execution.progress.WebUIProgressHandler._send_progress_state (0.3.52 only)"
    why = ("ComfyUI 0.3.52 broadcasts progress_state to every websocket; with several devices running, clients "
           "see each other's prompts. 0.3.75 addresses the submitter itself; there this patch changes nothing")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        if comfy.progress is None:
            return "comfy_execution.progress is not imported"
        return first_problem(
            lambda: require_callables(comfy.progress, "WebUIProgressHandler"),
            lambda: require_callables(comfy.progress.WebUIProgressHandler, "_send_progress_state"),
            lambda: require_signature(comfy.progress.WebUIProgressHandler._send_progress_state,
                                      "WebUIProgressHandler._send_progress_state", "self", "prompt_id", "nodes"),
        )

    def _apply(self, comfy: Comfy) -> None:
        handler = comfy.progress.WebUIProgressHandler  # type: ignore[union-attr]
        original = handler._send_progress_state
        if "client_id" in original.__code__.co_names:
            return  # this ComfyUI already sends progress_state to the submitting client only

        def _send_progress_state(self_: Any, prompt_id: str, nodes: Any) -> None:
            server = self_.server_instance
            if server is None:
                return original(self_, prompt_id, nodes)
            self_.server_instance = _SubmitterOnly(server)
            try:
                return original(self_, prompt_id, nodes)
            finally:
                self_.server_instance = server

        self.log.replace(handler, "_send_progress_state", _send_progress_state)
