"""Graceful shutdown on SIGTERM/SIGINT.

Stock ComfyUI dies on SIGTERM and takes its queue with it. Here the first signal starts a drain: new prompts get a
503 with ``Retry-After`` (reads keep working), queued prompts stop starting, and running ones get up to
``drain_timeout`` seconds to finish. Then the process stops the way Ctrl-C stops stock ComfyUI (a
``KeyboardInterrupt`` out of the event loop, so ComfyUI's own clean-up runs and the exit code is 0). A second
signal cuts the drain short.

Nothing needs saving at that point: every accepted prompt (pooled ones too) is already in the write-ahead queue
with the route it was accepted on (``journal.py``), and the next start queues it again (``recovery.py``). The drain
only marks the running prompts it cut off as queued, so that the next start does not count them as crashed. With
the store off (``--no-persist``), queued and pooled prompts are recorded in history as errors at once, so an
accepted prompt always ends in history or in the store.

The launcher and the drop-in custom node install the same handlers, from ``MultiDeviceServer.start_workers``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from ..scheduling import worker_context
from .journal import Journal
from .journal_writer import JournalWriter

if TYPE_CHECKING:
    from ..server.multigpu import MultiDeviceServer

log = logging.getLogger("comfy_parallel")

NOT_RUN_MESSAGE = "server shut down before this prompt ran"
POLL_S = 0.05
PARK_GRACE_S = 5.0  # after cutting prompts off: how long workers get to stop before the process exits
STORE_DIR = "__comfy_parallel"  # "__" keeps it out of ComfyUI's /userdata API (a system user directory)


def default_persist_path() -> Path:
    """``<ComfyUI user directory>/__comfy_parallel/queue.sqlite3`` (ComfyUI is imported by now)."""
    import folder_paths  # type: ignore[import-not-found]

    return Path(folder_paths.get_user_directory()) / STORE_DIR / "queue.sqlite3"


class GracefulShutdown:
    """The drain state of one server; ``install`` puts it behind SIGTERM and SIGINT on ComfyUI's event loop."""

    def __init__(self, server: "MultiDeviceServer", journal: Journal | None, drain_timeout: float) -> None:
        self.server = server
        self.journal = journal
        self.writer: "JournalWriter | None" = None  # set with the journal: what it was handed is stored before exit
        self.drain_timeout = drain_timeout
        self.deadline: float | None = None
        self.hurry = asyncio.Event()
        self.task: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def retry_after_s(self) -> int:
        """What a rejected client is told: the drain's time left, after which a restarted server takes prompts."""
        if self.deadline is None:
            return 1
        return max(1, math.ceil(self.deadline - time.monotonic()))

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Must run on the loop's (main) thread: ``add_signal_handler`` sets Python's signal handlers."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        log.info("comfy-parallel: on SIGTERM/SIGINT running prompts get up to %.0f s to finish; queued prompts "
                 "are %s",
                 self.drain_timeout, f"kept in {self.journal.path}" if self.journal is not None
                 else "recorded as errors (persistence is off)")

    def on_signal(self, sig: signal.Signals) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.drain(sig))
            return
        log.warning("comfy-parallel: %s again: stopping now", sig.name)
        self.hurry.set()

    async def drain(self, sig: signal.Signals) -> None:
        cut: list[tuple[int, tuple]] = []
        try:
            cut = await self._drain(sig)
        except Exception:  # a bug here must not leave a process that neither serves nor exits
            log.exception("comfy-parallel: drain failed; stopping now")
        asyncio.get_running_loop().call_soon(self._stop, cut)

    async def _drain(self, sig: signal.Signals) -> list[tuple[int, tuple]]:
        queues = self.server.queues
        self.deadline = time.monotonic() + self.drain_timeout
        queues.hold()
        stats = queues.stats()
        pooled = (queues.pool_stats() or {}).get("length", 0)
        log.info("comfy-parallel: %s received: draining (%d running, %d queued); new prompts get 503 for up to "
                 "%.0f s", sig.name, sum(s.running for s in stats), sum(s.queued for s in stats) + pooled,
                 self.drain_timeout)
        if self.journal is None:
            failed = self._fail_queued()
            if failed:
                log.warning("comfy-parallel: persistence is off: %d queued prompts recorded as errors (%s)",
                            len(failed), NOT_RUN_MESSAGE)
        finished_all = await self._wait_parked(self.deadline)
        cut: list[tuple[int, tuple]] = []
        if not finished_all:
            cut = queues.cut_off()
            for index in sorted({index for index, _ in cut}):
                ctx = worker_context.get(index)
                if ctx is not None:
                    ctx.set_interrupt(True)
            log.warning("comfy-parallel: drain %s: %d running prompts cut off (%s)",
                        "cut short" if self.hurry.is_set() else f"timeout after {self.drain_timeout:.0f} s",
                        len(cut), ", ".join(item[1] for _, item in cut) or "none")
            await self._wait_parked(time.monotonic() + PARK_GRACE_S, hurry=False)
        return cut

    def _stop(self, cut: list[tuple[int, tuple]]) -> None:
        """Persist and stop in one loop callback: no request handler runs between the two to queue a prompt.

        A plain callback rather than the drain task raises, so asyncio does not log the task's exception.
        """
        self._persist(cut)
        log.info("comfy-parallel: shutdown complete")
        raise KeyboardInterrupt  # ends run_until_complete as Ctrl-C does in stock ComfyUI

    def _fail_queued(self) -> list[str]:
        """Persistence off: queued prompts end in history as errors, and their clients are told at once."""
        failed = [pair for q in self.server.queues.devices for pair in q.fail_queued(NOT_RUN_MESSAGE)]
        failed += self.server.queues.fail_pooled(NOT_RUN_MESSAGE)
        prompt_server = self.server.prompt_server
        for item, error in failed:
            client_id = item[3].get("client_id") if isinstance(item[3], dict) else None
            if client_id is not None and prompt_server is not None:
                prompt_server.send_sync("execution_error", error, client_id)
                prompt_server.send_sync("executing", {"node": None, "prompt_id": item[1]}, client_id)
        return [item[1] for item, _ in failed]

    async def _wait_parked(self, deadline: float, hurry: bool = True) -> bool:
        while not self.server.queues.parked():
            if time.monotonic() >= deadline or (hurry and self.hurry.is_set()):
                return False
            if not hurry:
                await asyncio.sleep(POLL_S)
                continue
            try:
                await asyncio.wait_for(self.hurry.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass
        return True

    def _persist(self, cut: list[tuple[int, tuple]]) -> None:
        if self.journal is None:
            late = self._fail_queued()
            if late or cut:
                log.warning("comfy-parallel: persistence is off: lost %d prompts queued while draining (%s) and "
                            "%d running prompts (%s)", len(late), ", ".join(late) or "none", len(cut),
                            ", ".join(item[1] for _, item in cut) or "none")
            return
        warmup = getattr(self.server, "warmup", None)
        queued = [item for _, item in self.server.queues.queued_items()
                  if warmup is None or item[1] not in warmup.pending]
        cut_ids = [item[1] for _, item in cut if warmup is None or item[1] not in warmup.pending]
        if self.writer is not None and not self.writer.flush():
            log.error("comfy-parallel: prompts put from another thread were still being written to %s at exit; "
                      "they may be lost", self.journal.path)
        try:
            self.journal.requeued(cut_ids)
        except Exception as err:  # the process stops either way: they count as crashed at the next start
            log.error("comfy-parallel: could not mark %d cut-off prompts as queued in %s (%s: %s)", len(cut_ids),
                      self.journal.path, type(err).__name__, err)
        if queued or cut_ids:
            log.info("comfy-parallel: persisted %d prompts (%d queued, %d cut off while running) in %s; the next "
                     "start queues them again", len(queued) + len(cut_ids), len(queued), len(cut_ids),
                     self.journal.path)


def rejection(shutdown: GracefulShutdown, request: web.Request) -> web.Response:
    """503 for a new prompt while draining: ComfyUI's error shape, so clients show the message."""
    retry = shutdown.retry_after_s()
    message = f"the server is shutting down and takes no new prompts; retry in {retry} s"
    body = {"error": {"type": "shutting_down", "message": message, "details": "", "extra_info": {}},
            "node_errors": {}}
    return web.json_response(body, status=503, headers={"Retry-After": str(retry)})
