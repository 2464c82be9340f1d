"""Prompts that a shutdown left unfinished, kept in SQLite until the next start queues them again.

Plain Python (stdlib ``sqlite3`` and ``json``, no ComfyUI imports) so it can be tested alone. An item is a ComfyUI
queue tuple ``(number, prompt_id, prompt, extra_data, outputs_to_execute[, sensitive])``; its first five fields
are stored as JSON, so the prompt comes back with the same id, number (queue order) and extra_data (client_id
included), and with the route it was accepted with: a device index (``"1"``; an untargeted prompt that
``--default-route auto`` bound on arrival included) or ``"pool"`` (an untargeted prompt of ``--default-route pool``,
which is pooled again, whichever device it was running on when it was cut off). The next start queues it through
the same routing entry point as a new prompt (``DeviceQueues.route_put``).

Secrets are never written: ComfyUI 0.3.75 keeps API-node credentials in the sixth field (``sensitive``), 0.3.52
keeps them in ``extra_data``. Both are dropped (the names of the dropped keys are kept, not their values), so a
restored prompt that needed them runs without them and its API nodes report the missing credentials.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

# WARNING: mirrors ComfyUI's execution.SENSITIVE_EXTRA_DATA_KEYS (0.3.52-0.3.75); a key added upstream and not
# here would be written to disk in clear by 0.3.52-style items that carry secrets in extra_data.
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
SCHEMA_VERSION = 2  # 2: the route column (1 had the device index alone)

QUEUED = "queued"
RUNNING = "running"  # cut off by the drain timeout: it never finished, so it never reached history


@dataclass(frozen=True)
class PersistedPrompt:
    route: str  # a device index as a string, or "pool"
    item: tuple
    state: str  # QUEUED or RUNNING
    dropped_keys: tuple[str, ...] = ()

    @property
    def prompt_id(self) -> str:
        return str(self.item[1])

    @property
    def gpu_id(self) -> int:
        """The device column: the route's index, -1 for a pooled prompt."""
        return int(self.route) if self.route.isdigit() else -1


def _public_fields(item: tuple) -> tuple[list, list[str]]:
    """The first five fields with every secret removed, and the names of what was removed."""
    number, prompt_id, prompt, extra_data, outputs = item[:5]
    dropped = sorted(str(k) for k in (item[5] if len(item) > 5 and isinstance(item[5], dict) else {}))
    extra = dict(extra_data or {})
    for key in SENSITIVE_EXTRA_DATA_KEYS:
        if key in extra:
            extra.pop(key)
            dropped.append(key)
    return [number, prompt_id, prompt, extra, list(outputs)], sorted(set(dropped))


class PromptStore:
    """One SQLite file; every call opens its own connection, so any thread may call it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10)
        conn.execute("CREATE TABLE IF NOT EXISTS prompts ("
                     " prompt_id TEXT PRIMARY KEY,"
                     " gpu_id INTEGER NOT NULL,"
                     " state TEXT NOT NULL,"
                     " item TEXT NOT NULL,"
                     " dropped_keys TEXT NOT NULL,"
                     " saved_at REAL NOT NULL,"
                     " route TEXT)")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(prompts)")}
        if "route" not in columns:  # a file from schema 1: its rows' route is their device
            conn.execute("ALTER TABLE prompts ADD COLUMN route TEXT")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return conn

    def save(self, prompts: Iterable[PersistedPrompt]) -> list[str]:
        """Write ``prompts`` in one transaction (a prompt id saved before is replaced); return the ids written.

        Raises ``TypeError``/``ValueError`` naming the prompt if one is not JSON (nothing is written then).
        """
        rows = []
        now = time.time()
        for p in prompts:
            fields, dropped = _public_fields(p.item)
            try:
                encoded = json.dumps(fields)
            except (TypeError, ValueError) as err:
                raise type(err)(f"prompt {p.prompt_id} cannot be stored as JSON: {err}") from err
            rows.append((p.prompt_id, p.gpu_id, p.state, encoded, json.dumps(dropped), now, p.route))
        if not rows:
            return []
        conn = self._connect()
        try:
            with conn:
                conn.executemany("INSERT OR REPLACE INTO prompts (prompt_id, gpu_id, state, item, dropped_keys, "
                                 "saved_at, route) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        finally:
            conn.close()
        return [r[0] for r in rows]

    def load(self) -> list[PersistedPrompt]:
        """Every stored prompt in queue order (number, then the order they were saved); nothing is removed."""
        if not self.path.exists():
            return []
        conn = self._connect()
        try:
            rows = conn.execute("SELECT gpu_id, route, state, item, dropped_keys FROM prompts ORDER BY rowid"
                                ).fetchall()
        finally:
            conn.close()
        prompts = [PersistedPrompt(route or str(gpu_id), tuple(json.loads(item)), state, tuple(json.loads(dropped)))
                   for gpu_id, route, state, item, dropped in rows]
        return sorted(prompts, key=lambda p: p.item[0])

    def remove(self, prompt_ids: Iterable[str]) -> None:
        ids = [(str(i),) for i in prompt_ids]
        if not ids or not self.path.exists():
            return
        conn = self._connect()
        try:
            with conn:
                conn.executemany("DELETE FROM prompts WHERE prompt_id = ?", ids)
        finally:
            conn.close()

    def count(self) -> int:
        if not self.path.exists():
            return 0
        conn = self._connect()
        try:
            return int(conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0])
        finally:
            conn.close()


def as_queue_item(prompt: PersistedPrompt, item_length: int) -> tuple:
    """The tuple the running ComfyUI expects: 6 fields (an empty ``sensitive``) on 0.3.75, 5 on 0.3.52."""
    base: tuple[Any, ...] = tuple(prompt.item[:5])
    return base + ({},) if item_length >= 6 else base
