"""Figures of the reliability tests (load, faults) and of upstream's suite (conformance), collected in
test-artifacts/reliability.json.

Tests call :func:`record`; several pytest processes may write at once, so every write is a read-modify-write of
the whole file under an exclusive ``fcntl`` lock. ``conftest.py`` clears the file when a session starts and
renders it into ``tests/results/reliability.md`` when the session ends (:func:`render_markdown`), so the committed
table always comes from one run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
JSON_PATH = REPO / "test-artifacts" / "reliability.json"
LOCK_PATH = JSON_PATH.with_suffix(".lock")
MARKDOWN_PATH = REPO / "tests" / "results" / "reliability.md"
SESSION_ENV = "COMFY_PARALLEL_RELIABILITY_SESSION"

Figure = int | float | str
_this_process: dict[str, dict[str, Figure]] = {}  # what this process recorded, should another session clear the file


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Hold an exclusive lock on a side file (the JSON itself is replaced, so it cannot carry the lock)."""
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read() -> dict[str, dict[str, Figure]]:
    try:
        data = json.loads(JSON_PATH.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(data: dict[str, dict[str, Figure]]) -> None:
    tmp = JSON_PATH.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(JSON_PATH)


def record(section: str, figures: dict[str, Figure]) -> None:
    """Merge ``figures`` into ``section`` of the JSON file (later values of a key win)."""
    with _locked():
        data = _read()
        merged = dict(data.get(section, {}))
        merged.update(figures)
        session = os.environ.get(SESSION_ENV)
        if session:
            merged["_session"] = session
        data[section] = merged
        _write(data)
    _this_process.setdefault(section, {}).update(merged)


def clear(session: str) -> None:
    """Start a session: empty the JSON and mark the figures recorded from now on as this session's."""
    os.environ[SESSION_ENV] = session
    with _locked():
        _write({})


def sections_of(session: str) -> dict[str, dict[str, Figure]]:
    with _locked():
        data = _read()
    found = {name: figs for name, figs in data.items() if isinstance(figs, dict) and figs.get("_session") == session}
    for name, figs in _this_process.items():
        if figs.get("_session") == session:
            found[name] = {**found.get(name, {}), **figs}
    return found


# Columns of the summary table: (heading, figure key). Missing figures show as a dash.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("prompts sent", "prompts_sent"),
    ("lost", "lost"),
    ("duplicated", "duplicated"),
    ("wrong device", "wrong_device"),
    ("ws misdelivered", "ws_misdelivered"),
    ("5xx", "http_5xx"),
    ("faults injected", "faults_injected"),
    ("faults survived", "faults_survived"),
    ("wall s", "wall_s"),
)


def _cell(value: Figure | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


# Sections recorded by tests/test_upstream_execution.py: upstream's own suite run against stock and the drop-in.
# Their figures are per server (``stock_passed``, ``dropin_passed``, ...), so they get a table of their own.
CONFORMANCE = "conformance"
CONFORMANCE_RUNS: tuple[tuple[str, str], ...] = (("stock", "stock"), ("dropin", "drop-in, {workers} CPU workers"))
CONFORMANCE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("passed", "passed"), ("failed", "failed"), ("skipped", "skipped"), ("wall s", "wall_s"))


def _conformance_lines(rows: list[tuple[str, dict[str, Figure]]]) -> list[str]:
    """One row per server (stock, drop-in) of each conformance section; the two runs went at the same time."""
    lines = [
        "", "## Conformance: upstream's own tests, unmodified", "",
        "Stock ComfyUI and the drop-in run the suite at the same time, each from its own copy of the ComfyUI tree,",
        "with upstream's `--skip-timing-checks` (`tests/test_upstream_execution.py`).",
        "",
        "| suite | ComfyUI | server | " + " | ".join(h for h, _ in CONFORMANCE_COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(CONFORMANCE_COLUMNS),
    ]
    for _, figs in rows:
        for prefix, label in CONFORMANCE_RUNS:
            cells = [str(figs.get("suite", "-")), str(figs.get("comfyui", "-")),
                     label.format(workers=figs.get("dropin_workers", "?"))]
            cells += [_cell(figs.get(f"{prefix}_{key}")) for _, key in CONFORMANCE_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


# Figures of benchmarks that are not tests (they measure, they do not pass or fail), from their committed results.
BENCHMARKS: tuple[tuple[str, Path], ...] = (
    ("Write-ahead queue: cost and crash recovery", REPO / "bench" / "results" / "crash_safe_queue_cpu.json"),
    ("Write-ahead queue: cost and crash recovery, quiet 16-core machine",
     REPO / "bench" / "results" / "crash_safe_queue_device.json"),
)


def _benchmark_lines() -> list[str]:
    lines: list[str] = []
    for title, path in BENCHMARKS:
        try:
            figures = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            continue
        lines += ["", f"## Benchmark: {title}", "",
                  f"Not a test; `{figures.get('command', '?')}` on {figures.get('date', '?')} "
                  f"({path.relative_to(REPO)}).", ""]
        # As the benchmark wrote them (rounded there): a ratio such as 0.973 must not read as 1.0.
        lines += [f"- {key}: {value}" for key, value in figures.items() if key not in ("command", "date")]
    return lines


def render_markdown(sections: dict[str, dict[str, Figure]], command: str,
                    when: _dt.datetime | None = None) -> str:
    """The committed summary: one row per section and ComfyUI version, the conformance runs, then every other
    figure recorded."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    shown = {key for _, key in COLUMNS} | {"comfyui", "section", "_session"}
    shown_conformance = {"comfyui", "section", "_session", "suite", "dropin_workers"} | {
        f"{prefix}_{key}" for prefix, _ in CONFORMANCE_RUNS for _, key in CONFORMANCE_COLUMNS}
    rows = sorted(sections.items(), key=lambda kv: (str(kv[1].get("section", kv[0])), str(kv[1].get("comfyui", ""))))
    conformance = [(name, figs) for name, figs in rows if figs.get("section") == CONFORMANCE]
    rows = [(name, figs) for name, figs in rows if figs.get("section") != CONFORMANCE]
    lines = [
        "# Reliability results",
        "",
        f"Produced by `make test` (this file: `{command}`) on {when.strftime('%Y-%m-%d %H:%M UTC')}.",
        "Real ComfyUI, real HTTP and websockets on 127.0.0.1, three CPU workers standing in for GPUs.",
        "Rendered from `test-artifacts/reliability.json` by `tests/conftest.py` at the end of the session.",
    ]
    if rows:
        lines += [
            "",
            "| section | ComfyUI | " + " | ".join(h for h, _ in COLUMNS) + " |",
            "|---|---|" + "---|" * len(COLUMNS),
        ]
    for name, figs in rows:
        cells = [str(figs.get("section", name)), str(figs.get("comfyui", "-"))]
        cells += [_cell(figs.get(key)) for _, key in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if conformance:
        lines += _conformance_lines(conformance)
    lines += _benchmark_lines()
    lines += ["", "## Other figures", ""]
    for name, figs in rows + conformance:
        extra = {k: v for k, v in figs.items()
                 if k not in (shown_conformance if figs.get("section") == CONFORMANCE else shown)}
        if extra:
            details = ", ".join(f"{k}={_cell(v)}" for k, v in sorted(extra.items()))
            lines.append(f"- {name}: {details}")
    return "\n".join(lines) + "\n"


def write_markdown(session: str, command: str) -> Path | None:
    """Write the markdown file if this session recorded anything; return its path."""
    sections = sections_of(session)
    if not sections:
        return None
    MARKDOWN_PATH.parent.mkdir(parents=True, exist_ok=True)
    MARKDOWN_PATH.write_text(render_markdown(sections, command))
    return MARKDOWN_PATH
