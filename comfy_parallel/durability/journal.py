"""The write-ahead queue store: every accepted prompt until its history entry is written, and the last history entries.

One ComfyUI process serves every GPU, so a crash of that process (``kill -9``, a native crash in a custom node, the
OOM killer, a CUDA fatal error) would lose every device's queue and history at once. Here a prompt is durable
before ``POST /prompt`` answers (in the memory-mapped staging log, ``staging.py``, which the journal writer's
thread empties into this file; or in this file itself with ``synchronous=FULL``) and leaves the store in the same
statement that writes its history entry; the next start queues what is left again (``recovery.py``). A graceful
drain uses the same rows: the prompts it leaves behind are already here.

A prompt is stored with its *route*: the string the queues' routing entry point (``DeviceQueues.route_put``) took
it on: a device index (``"1"``: targeted, or untargeted and bound on arrival by ``--default-route auto``) or
``"pool"``. The store only keeps and returns it, so a new kind of route needs no change here. A worker's start also
records its device (staged like the accept, then written here by the journal writer's thread), so that a prompt
running at a crash runs again where it ran (``recovery.py``).

Plain Python (stdlib ``sqlite3`` and ``json``, no ComfyUI imports) so it can be tested alone. An item is a ComfyUI
queue tuple ``(number, prompt_id, prompt, extra_data, outputs_to_execute[, sensitive])``; its first five fields are
stored as JSON. Secrets are never written: ComfyUI 0.3.75 and 0.33 keep API-node credentials in the sixth field
(``sensitive``), 0.3.52 kept them in ``extra_data``. Both are dropped (only the names of the dropped keys are kept),
so a prompt queued again after a restart runs without them and its API nodes report the missing credentials.

WAL mode with ``synchronous=NORMAL`` (default): a commit is a write into the WAL file, which the kernel keeps when the
process dies, so nothing accepted is lost to a process crash; only a power loss or kernel crash can lose the last
commits. ``FULL`` adds an fsync per commit for that case (``bench/crash_safe_queue.py`` measures both).

Every write is one SQL statement in autocommit mode: the sqlite3 module gives up the GIL for each statement it
steps, and a thread that gave it up waits for it again behind busy worker threads, so a write costs one hand-over,
not three (``BEGIN``, the statement, ``COMMIT``). Nor does a write hold a Python lock: SQLite serializes the
statements of threads that share its connection (``sqlite3.threadsafety`` 3) and lets go as each one's step ends,
while a Python lock around ``execute`` stays held until the writer has the GIL back, so the journal thread's write
of accepted prompts would wait for a worker that waits for the GIL. The queue table is keyed by prompt id alone
(``WITHOUT ROWID``), so a write changes one B-tree, not a table and its index (history rows are larger than its
B-tree keeps in a page, so they stay in a rowid table).
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .staging import ACCEPT, FINISH, FORGET_HISTORY, START

try:
    import orjson
except ImportError:  # a dependency of comfy-parallel; without it (a hand-made environment) json writes everything
    orjson = None  # type: ignore[assignment]

# WARNING: mirrors ComfyUI's execution.SENSITIVE_EXTRA_DATA_KEYS (0.3.52-0.33.0); a key added upstream and not
# here would be written to disk in clear by items that carry secrets in extra_data.
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
# 1 and 2: the drain-only store (prompts saved at shutdown; 1 with a device index each, 2 with a route too),
# converted on open.
SCHEMA_VERSION = 3
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
MAX_ROWS_PER_STATEMENT = 100  # ids per DELETE or UPDATE statement: under SQLite's oldest limit of 999 parameters

QUEUED = "queued"
RUNNING = "running"  # a worker took it; still RUNNING at the next start means the process died while it ran

_PROMPT_COLUMNS = "(prompt_id, route, number, state, crashes, item, dropped_keys, accepted_at)"
_PROMPT_ROW = "(?, ?, ?, ?, ?, ?, ?, ?)"
# Journal.write_batch: one row of the ``staged`` view per element of a JSON array (``_batch_json``), in order.
_BATCH_SQL = ("INSERT INTO staged SELECT " + ", ".join(f"json_extract(value, '$[{i}]')" for i in range(7))
              + " FROM json_each(?) ORDER BY key")
_ACCEPT_AGAIN = 0  # a kind of the ``staged`` view alone: an accept applied again at a start keeps a stored row


def _batch_json(rows: Sequence[tuple], starts: dict[str, int], finishes: Sequence[tuple[str, str]],
                keep_existing: bool = False) -> str:
    """The rows of the ``staged`` view, as ``_BATCH_SQL`` reads them."""
    accept = _ACCEPT_AGAIN if keep_existing else ACCEPT
    ops: list[list[Any]] = [[accept, pid, route, number, item, dropped, accepted_at]
                            for pid, route, number, _, _, item, dropped, accepted_at in rows]
    ops.extend([START, pid, device] for pid, device in starts.items())
    ops.extend([FINISH, pid, entry] for pid, entry in finishes)
    return dumps(ops).decode()


@dataclass(frozen=True)
class StoredPrompt:
    """One unfinished prompt as the store has it."""

    route: str
    item: tuple
    state: str  # QUEUED or RUNNING
    crashes: int = 0  # how many times the server died while this prompt ran
    dropped_keys: tuple[str, ...] = ()
    device: int | None = None  # where it last started

    @property
    def prompt_id(self) -> str:
        return str(self.item[1])


# json.dumps's output for everything json.dumps would write: keys that are not strings written as strings, dataclasses
# and datetimes left to ``default`` as json.dumps leaves them. What json writes differently (floats NaN and
# +-Infinity: orjson writes null, as a browser's JSON.stringify does; integers beyond 64 bits: orjson refuses them,
# then json writes them) is rare enough that the speed wins: orjson encodes a history entry in ~0.7 us against json's
# ~11 us, and every prompt's entry is encoded on its worker, holding the GIL (bench/results/crash_safe_queue_device.md).
_ORJSON_OPTIONS = (orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
                   if orjson is not None else 0)


def dumps(obj: Any, default: Any = None) -> bytes:
    """``obj`` as JSON (UTF-8): with orjson, or json where orjson refuses it (a big integer, a string with a lone
    surrogate); raises ``TypeError``/``ValueError`` as json.dumps does."""
    if orjson is not None:
        try:
            return orjson.dumps(obj, default=default, option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(obj, default=default).encode()


def public_fields(item: tuple) -> tuple[list, list[str]]:
    """The first five fields with every secret removed, and the names of what was removed. The fields are only
    encoded, never changed, so ``extra_data`` is copied only when a secret is taken out of it (the common prompt,
    without secrets, costs no copy on the event loop)."""
    number, prompt_id, prompt, extra_data, outputs = item[:5]
    sensitive = item[5] if len(item) > 5 and isinstance(item[5], dict) else None
    if not sensitive and not (extra_data and any(key in extra_data for key in SENSITIVE_EXTRA_DATA_KEYS)):
        return [number, prompt_id, prompt, extra_data or {}, list(outputs)], []
    dropped = [str(k) for k in (sensitive or {})]
    extra = dict(extra_data or {})
    for key in SENSITIVE_EXTRA_DATA_KEYS:
        if key in extra:
            extra.pop(key)
            dropped.append(key)
    return [number, prompt_id, prompt, extra, list(outputs)], sorted(set(dropped))


def public_entry(entry: dict) -> dict:
    """A history entry with its prompt's secrets removed (ComfyUI already strips ``sensitive`` from it)."""
    prompt = entry.get("prompt")
    if isinstance(prompt, (list, tuple)) and len(prompt) >= 5:
        fields, _ = public_fields(tuple(prompt))
        entry = {**entry, "prompt": fields + list(prompt[6:] if len(prompt) > 6 else [])}
    return entry


def as_queue_item(prompt: StoredPrompt, item_length: int) -> tuple:
    """The tuple the running ComfyUI expects: 6 fields (an empty ``sensitive``) on 0.3.75/0.33, 5 on 0.3.52."""
    base: tuple[Any, ...] = tuple(prompt.item[:5])
    return base + ({},) if item_length >= 6 else base


def encode_item(item: tuple) -> tuple[str, str]:
    """The stored JSON of ``item`` (its secrets dropped) and of the names of what was dropped; raises ``TypeError``
    or ``ValueError`` naming the prompt if it cannot be stored as JSON."""
    fields, dropped = public_fields(item)
    try:
        encoded = dumps(fields).decode()
    except (TypeError, ValueError) as err:
        raise type(err)(f"prompt {item[1]} cannot be stored as JSON: {err}") from err
    return encoded, dumps(dropped).decode() if dropped else "[]"


def prompt_row(route: str, item: tuple, now: float, encoded: tuple[str, str] | None = None) -> tuple:
    """The ``prompts`` row of a newly accepted ``item``; ``encoded``: its ``encode_item``, if done already."""
    fields, dropped = encoded if encoded is not None else encode_item(item)
    return (str(item[1]), route, _number_key(item[0]), QUEUED, 0, fields, dropped, now)


def history_json(entry: dict) -> str:
    """A history entry as the store keeps it: JSON, its prompt's secrets removed."""
    return dumps(public_entry(entry), default=str).decode()


def row_bytes(row: tuple) -> bytes:
    """A ``prompt_row`` as the staging log keeps it: the small fields as JSON, a newline, the item's JSON as is
    (JSON text has no raw newline, so the item is not encoded twice)."""
    prompt_id, route, number, _, _, item, dropped, accepted_at = row
    return dumps([prompt_id, route, number, dropped, accepted_at]) + b"\n" + item.encode()


def row_from_bytes(data: bytes) -> tuple:
    head, _, item = data.partition(b"\n")
    prompt_id, route, number, dropped, accepted_at = json.loads(head)
    json.loads(item)  # a record the kernel did not keep whole (a power loss) is refused, not stored
    return (prompt_id, route, number, QUEUED, 0, item.decode(), dropped, accepted_at)


def finish_bytes(prompt_id: str, entry_json: str, evicted: Sequence[str]) -> bytes:
    """A history entry as the staging log keeps it: id and evicted ids as JSON, a newline, the entry's JSON."""
    return dumps([prompt_id, list(evicted)]) + b"\n" + entry_json.encode()


def finish_from_bytes(data: bytes) -> tuple[str, str, list[str]]:
    head, _, entry = data.partition(b"\n")
    prompt_id, evicted = json.loads(head)
    json.loads(entry)  # a record the kernel did not keep whole (a power loss) is refused, not stored
    return str(prompt_id), entry.decode(), [str(p) for p in evicted]


def _number_key(number: Any) -> float:
    """The queue position as the store orders by: finite (JSON has no infinity, and ``write_batch`` goes through
    JSON; a client can send ``"number": 1e999``), NaN as 0."""
    try:
        value = float(number)
    except (TypeError, ValueError):
        return 0.0
    if math.isnan(value):
        return 0.0
    return max(-sys.float_info.max, min(sys.float_info.max, value))


class StoreUnsupported(RuntimeError):
    """This Python's SQLite lacks what the store needs; the store file itself is fine."""


def check_sqlite() -> None:
    """Raise ``StoreUnsupported`` unless SQLite has the JSON functions ``Journal.write_batch`` uses."""
    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as conn:
            conn.execute("SELECT json_extract(value, '$[0]') FROM json_each('[[1]]')").fetchall()
    except sqlite3.OperationalError as err:
        raise StoreUnsupported(f"SQLite {sqlite3.sqlite_version} has no JSON functions ({err}), which the "
                               "write-ahead store needs: use a Python whose SQLite is 3.38 or later (or built with "
                               "JSON1), or run without the store (--no-persist)") from err


def _with_number(item: list, number: float) -> tuple:
    """A stored item as a tuple; a number JSON could not hold (infinite: orjson wrote null) is the stored key,
    since ComfyUI's queue compares numbers."""
    return tuple(item) if item[0] is not None else (number, *item[1:])


class Journal:
    """One SQLite file in WAL mode, one connection shared by the HTTP thread and the workers.

    Every method has committed when it returns (who calls which, and who waits for it: ``journal_writer.py``).
    Each write is one statement, atomic on its own; the few steps that take several (opening, ``apply_staged``,
    ``history_ids``, ``count_crash``) run at start, before anything else writes.
    """

    def __init__(self, path: Path | str, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous={synchronous!r}; use one of {', '.join(SYNCHRONOUS_MODES)}")
        check_sqlite()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Only where SQLite does not serialize a shared connection itself do statements take a lock of ours.
        self.lock: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if sqlite3.threadsafety == 3 else threading.Lock())
        self.conn = sqlite3.connect(self.path, timeout=1, isolation_level=None, check_same_thread=False)
        # EXCLUSIVE: this process alone writes the file (a second server on the same file would run its prompts
        # twice), and WAL needs no shared-memory index then; every commit is a few syscalls fewer.
        self.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._evicting = threading.Lock()  # guards _evicted alone, never held during I/O
        self._evicted: set[str] = set()  # evicted history entries not deleted yet (see ``finished``)
        self._create()
        self._create_batch_view()

    def _create(self) -> None:
        with self.lock, self._transaction():
            version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if version < SCHEMA_VERSION and "prompts" in tables:
                self.conn.execute("ALTER TABLE prompts RENAME TO prompts_drained")
            self.conn.execute("CREATE TABLE IF NOT EXISTS prompts ("
                              " prompt_id TEXT PRIMARY KEY, route TEXT NOT NULL, number REAL NOT NULL,"
                              " state TEXT NOT NULL, crashes INTEGER NOT NULL DEFAULT 0, item TEXT NOT NULL,"
                              " dropped_keys TEXT NOT NULL, accepted_at REAL NOT NULL, device INTEGER) WITHOUT ROWID")
            # seq: the order entries finished in (ComfyUI's history is a dict in that order); not AUTOINCREMENT,
            # which writes a counter row on every insert.
            self.conn.execute("CREATE TABLE IF NOT EXISTS history ("
                              " seq INTEGER PRIMARY KEY, prompt_id TEXT NOT NULL UNIQUE, entry TEXT NOT NULL)")
            # A history entry and the end of its prompt's row are one statement, so one atomic commit.
            self.conn.execute("CREATE TRIGGER IF NOT EXISTS finished AFTER INSERT ON history BEGIN"
                              " DELETE FROM prompts WHERE prompt_id = NEW.prompt_id; END")
            if version < SCHEMA_VERSION and "prompts" in tables:
                # Prompts a drain saved before the store became a write-ahead log: none of them crashed. Schema 1
                # had a device index alone, schema 2 a route too (empty for rows written by schema 1).
                columns = {r[1] for r in self.conn.execute("PRAGMA table_info(prompts_drained)")}
                route = "route" if "route" in columns else "NULL"
                rows = self.conn.execute(f"SELECT prompt_id, gpu_id, {route}, item, dropped_keys, saved_at"
                                         " FROM prompts_drained ORDER BY rowid").fetchall()
                self.conn.executemany(
                    f"INSERT OR REPLACE INTO prompts {_PROMPT_COLUMNS} VALUES {_PROMPT_ROW}",
                    [(pid, route or str(gpu), _number_key(json.loads(item)[0]), QUEUED, 0, item, dropped, saved)
                     for pid, gpu, route, item, dropped, saved in rows])
                self.conn.execute("DROP TABLE prompts_drained")
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _create_batch_view(self) -> None:
        """This connection's ``staged`` view (``write_batch``): each row inserted into it becomes, by its kind, an
        accepted prompt's row, a start, or a history entry (whose ``finished`` trigger ends the prompt's row), so
        each of these writes is spelled once, here. TEMP: nothing of it is in the file, so it needs no schema
        version."""
        self.conn.execute("CREATE TEMP VIEW IF NOT EXISTS staged (kind, prompt_id, a, b, c, d, e) AS"
                          " SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE 0")
        # An accept replaces a row of the same id; one applied again at a start keeps it (and its crash count).
        accepts = (("staged_accept", ACCEPT, "REPLACE"), ("staged_accept_again", _ACCEPT_AGAIN, "IGNORE"))
        for name, kind, conflict in accepts:
            self.conn.execute(f"CREATE TEMP TRIGGER IF NOT EXISTS {name} INSTEAD OF INSERT ON staged"
                              f" WHEN NEW.kind = {kind} BEGIN INSERT OR {conflict} INTO prompts {_PROMPT_COLUMNS}"
                              f" VALUES (NEW.prompt_id, NEW.a, NEW.b, '{QUEUED}', 0, NEW.c, NEW.d, NEW.e); END")
        self.conn.execute(f"CREATE TEMP TRIGGER IF NOT EXISTS staged_start INSTEAD OF INSERT ON staged"
                          f" WHEN NEW.kind = {START} BEGIN UPDATE prompts SET state = '{RUNNING}', device = NEW.a"
                          f" WHERE prompt_id = NEW.prompt_id; END")
        self.conn.execute(f"CREATE TEMP TRIGGER IF NOT EXISTS staged_finish INSTEAD OF INSERT ON staged"
                          f" WHEN NEW.kind = {FINISH} BEGIN INSERT OR REPLACE INTO history (prompt_id, entry)"
                          f" VALUES (NEW.prompt_id, NEW.a); END")

    def _transaction(self) -> "_Transaction":
        return _Transaction(self.conn)

    def _write(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self.lock:
            self.conn.execute(sql, params)

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # -- the life of a prompt -------------------------------------------------------------------------------------
    def accepted(self, route: str, item: tuple) -> None:
        """Write ``item`` as queued on ``route``; raises (and writes nothing) if it cannot be stored as JSON."""
        self.accepted_many([(route, item)])

    def accepted_many(self, prompts: list[tuple[str, tuple]]) -> None:
        """Write prompts as queued in one statement, all or none (``journal_writer.py``'s batches)."""
        now = time.time()
        self.write_batch([prompt_row(route, item, now) for route, item in prompts], {}, [])

    def started(self, prompt_id: str, device: int) -> None:
        """Running on ``device``; a prompt no longer stored (it finished already) is left alone."""
        self.write_batch([], {prompt_id: device}, [])

    def requeued(self, prompt_ids: Iterable[str]) -> None:
        """Back to queued without counting a crash: prompts a drain cut off, or a retry after out of memory."""
        for chunk in _chunks(prompt_ids):
            self._write(f"UPDATE prompts SET state = ? WHERE prompt_id IN ({', '.join('?' * len(chunk))})",
                        (QUEUED, *chunk))

    def finished(self, prompt_id: str, entry: dict, evicted: Iterable[str] = ()) -> None:
        """The history entry is written and the prompt leaves the queue (the ``finished`` trigger), one statement."""
        self.write_batch([], {}, [(prompt_id, history_json(entry))], evicted)

    def write_batch(self, rows: Sequence[tuple], starts: dict[str, int], finishes: Sequence[tuple[str, str]],
                    evicted: Iterable[str] = ()) -> None:
        """Accepted prompts (``prompt_row`` rows, replacing a row of the same id), then starts, then history
        entries ``(prompt id, history_json)`` in the order they finished, each ending its prompt's row: one
        statement whatever their number, all or none. Every write of these goes through here.

        Why one: the sqlite3 module gives up the GIL for every statement it prepares and steps, and taking it back
        beside busy threads evicts whichever holds it, often the event loop (``journal_writer.py``). The batch goes
        in as one JSON array through the ``staged`` view, so the SQL text never changes and is prepared once.

        The ``evicted`` entries (beyond ComfyUI's history limit: one per prompt once it is reached) are deleted
        ``MAX_ROWS_PER_STATEMENT`` at a time, not one statement each; until then the store holds a few more than
        the limit, which ``history_ids`` trims at the next start.
        """
        due = self._due_evictions([pid for pid, _ in finishes], evicted)
        if rows or starts or finishes:
            self._write(_BATCH_SQL, (_batch_json(rows, starts, finishes),))
        if due:
            self.forget_history(due)

    def _due_evictions(self, finished: Iterable[str], evicted: Iterable[str]) -> list[str]:
        """Evicted entries to delete now: none until ``MAX_ROWS_PER_STATEMENT`` have gathered (an entry written
        again is not evicted)."""
        with self._evicting:
            self._evicted.difference_update(finished)
            self._evicted.update(str(p) for p in evicted)
            due = list(self._evicted) if len(self._evicted) >= MAX_ROWS_PER_STATEMENT else []
            self._evicted.difference_update(due)
        return due

    def forget_prompts(self, prompt_ids: Iterable[str]) -> None:
        """Queued prompts a client deleted (``POST /queue``): they will never run."""
        for chunk in _chunks(prompt_ids):
            self._write(f"DELETE FROM prompts WHERE prompt_id IN ({', '.join('?' * len(chunk))})", chunk)

    def forget_history(self, prompt_ids: Iterable[str] | None = None) -> None:
        """History entries a client deleted (``POST /history``) or that were evicted; ``None``: all of them."""
        if prompt_ids is None:
            self._write("DELETE FROM history")
            return
        for chunk in _chunks(prompt_ids):
            self._write(f"DELETE FROM history WHERE prompt_id IN ({', '.join('?' * len(chunk))})", chunk)

    # -- at start ----------------------------------------------------------------------------------------------------
    def apply_staged(self, operations: Sequence[tuple[int, Any]]) -> None:
        """The staging log's records of the last run (``recovery.apply_staged``), in order, in one transaction:
        ``(ACCEPT, row)`` an accepted prompt (a prompt already stored keeps its row), ``(START, (id, device))`` a
        worker took it, ``(FORGET, ids)`` deleted prompts, ``(FINISH, (id, entry JSON, evicted ids))`` a history
        entry, ``(FORGET_HISTORY, ids or None)`` deleted history entries."""
        with self.lock, self._transaction():
            for kind, value in operations:
                if kind == ACCEPT:
                    self.conn.execute(_BATCH_SQL, (_batch_json([value], {}, [], keep_existing=True),))
                elif kind == START:
                    prompt_id, device = value
                    self.conn.execute(_BATCH_SQL, (_batch_json([], {prompt_id: device}, []),))
                elif kind == FINISH:
                    prompt_id, entry, evicted = value
                    self.conn.execute(_BATCH_SQL, (_batch_json([], {}, [(prompt_id, entry)]),))
                    self._delete("history", evicted)
                elif kind == FORGET_HISTORY:
                    if value is None:
                        self.conn.execute("DELETE FROM history")
                    else:
                        self._delete("history", value)
                else:
                    self._delete("prompts", value)

    def _delete(self, table: str, prompt_ids: Iterable[str]) -> None:
        for chunk in _chunks(prompt_ids):
            self.conn.execute(f"DELETE FROM {table} WHERE prompt_id IN ({', '.join('?' * len(chunk))})", chunk)

    def unfinished(self) -> list[StoredPrompt]:
        """Every prompt in the store, in queue order: number, then prompt id (the order of ComfyUI's heap)."""
        with self.lock:
            rows = self.conn.execute("SELECT route, state, crashes, item, dropped_keys, device, number FROM prompts"
                                     " ORDER BY number, prompt_id").fetchall()
        return [StoredPrompt(route, _with_number(json.loads(item), number), state, crashes,
                             tuple(json.loads(dropped)), device)
                for route, state, crashes, item, dropped, device, number in rows]

    def count_crash(self) -> list[str]:
        """The server died while the prompts still marked running ran: one more crash each, and queued again;
        returns their ids. Only at start, before any worker marks a prompt as running."""
        with self.lock:
            ids = [r[0] for r in self.conn.execute("SELECT prompt_id FROM prompts WHERE state = ?", (RUNNING,))]
            self.conn.execute("UPDATE prompts SET crashes = crashes + 1, state = ? WHERE state = ?", (QUEUED, RUNNING))
        return ids

    def history_ids(self, limit: int) -> list[str]:
        """The prompt ids of the last ``limit`` history entries, oldest first; older entries are deleted."""
        with self.lock:
            rows = self.conn.execute("SELECT seq, prompt_id FROM history ORDER BY seq").fetchall()
            kept = rows[max(0, len(rows) - limit):]
            if kept and len(kept) < len(rows):
                self.conn.execute("DELETE FROM history WHERE seq < ?", (kept[0][0],))
        return [pid for _, pid in kept]

    def history_entry(self, prompt_id: str) -> dict | None:
        """One stored history entry (a previous process's: this one keeps its own in memory)."""
        with self.lock:
            row = self.conn.execute("SELECT entry FROM history WHERE prompt_id = ?", (prompt_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def max_number(self) -> float | None:
        with self.lock:
            row = self.conn.execute("SELECT MAX(ABS(number)) FROM prompts WHERE number BETWEEN -1e300 AND 1e300"
                                    ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def count(self) -> int:
        with self.lock:
            return int(self.conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0])


def _chunks(prompt_ids: Iterable[str]) -> list[list[str]]:
    ids = [str(p) for p in prompt_ids]
    return [ids[i:i + MAX_ROWS_PER_STATEMENT] for i in range(0, len(ids), MAX_ROWS_PER_STATEMENT)]


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): autocommit connections need it spelled out."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
