"""What one call that gives the GIL up costs the calling thread while other threads run Python.

The event loop that answers HTTP shares the GIL with the worker threads. A call that gives the GIL up (a system
call, an SQLite statement) lets a busy worker take it, and the caller then waits for it again: up to Python's
switch interval (5 ms), after which the worker is asked to let go. This measures that wait per kind of call, with
0, 1 and 3 threads spinning in Python, so the write-ahead queue's design (issue 15) can be chosen by what each of
its steps costs: an epoll with nothing to wait for (one event-loop pass), a small socket send, an SQLite INSERT in
WAL mode (synchronous=NORMAL), an os.write, and a copy into a memory-mapped file (no system call).

usage: python bench/gil_handover.py [--calls 400] [--out FILE]
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import selectors
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path


def spin(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(1000):
            x += 1


def operations(folder: Path) -> dict[str, Callable[[], None]]:
    sel = selectors.DefaultSelector()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    sel.register(b, selectors.EVENT_READ)
    conn = sqlite3.connect(folder / "t.db", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID")
    fd = os.open(folder / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    mfd = os.open(folder / "map", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(mfd, 64 << 20)
    mapped = mmap.mmap(mfd, 64 << 20)
    payload = b"x" * 300
    counter = iter(range(10 ** 9))
    offset = [0]

    def select0() -> None:
        sel.select(0)

    def send() -> None:
        a.send(b"y")
        b.recv(16)

    def insert() -> None:
        conn.execute("INSERT INTO t VALUES (?, ?)", (str(next(counter)), payload.decode()))

    def write() -> None:
        os.write(fd, payload)

    def copy() -> None:
        o = offset[0] % ((64 << 20) - 1024)
        mapped[o:o + len(payload)] = payload
        offset[0] = o + len(payload)

    return {"epoll, timeout 0": select0, "socket send+recv": send, "SQLite INSERT (WAL, NORMAL)": insert,
            "os.write 300 B": write, "mmap copy 300 B": copy}


def measure(op: Callable[[], None], calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        op()
        times.append((time.perf_counter() - t0) * 1e6)
        for _ in range(200):  # some Python between calls, as a handler runs between statements
            pass
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = [f"# GIL hand-over cost per call ({time.strftime('%Y-%m-%d', time.gmtime())})", "",
             f"Command: `python {' '.join(sys.argv)}` ({platform.node() or 'host'}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, switch interval {sys.getswitchinterval() * 1e3:g} ms).", "",
             "Microseconds per call on the main thread, median / 90th percentile / mean, with N threads spinning "
             "in Python.", "", "| call | 0 spinning | 1 spinning | 3 spinning |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        ops = operations(Path(tmp))
        results: dict[str, list[str]] = {name: [] for name in ops}
        for spinners in (0, 1, 3):
            stop = threading.Event()
            threads = [threading.Thread(target=spin, args=(stop,), daemon=True) for _ in range(spinners)]
            for t in threads:
                t.start()
            for name, op in ops.items():
                times = measure(op, args.calls)
                q = statistics.quantiles(times, n=10)
                results[name].append(f"{statistics.median(times):.0f} / {q[8]:.0f} / {statistics.fmean(times):.0f}")
            stop.set()
            for t in threads:
                t.join()
    lines += [f"| {name} | {' | '.join(cells)} |" for name, cells in results.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
