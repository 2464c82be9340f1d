"""``comfy-parallel serve --supervise``: run the server as a child process and start it again after a crash.

One process serves every GPU, so a crash (``kill -9``, the OOM killer, a native crash in a custom node, the exit
code of a poisoned CUDA context) stops every device; the write-ahead queue (``journal.py``) keeps the prompts, and
this loop brings the server back. A clean exit (code 0: a drained SIGTERM/SIGINT) ends the supervisor too, and so
do the codes that say a restart cannot help (bad settings, a ComfyUI that fails the version gate).

The supervisor imports neither ComfyUI nor torch. The child runs in its own session so that a terminal's Ctrl-C or
a ``kill`` of the supervisor's process group reaches it once, forwarded by the supervisor (a second signal would cut
the drain short), and it gets SIGTERM if the supervisor itself dies.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from ..scheduling import cuda_fatal

NO_RESTART_CODES = {2: "bad settings", 3: "ComfyUI failed the version gate"}
QUICK_CRASH_S = 30.0  # a child that crashed sooner than this after its start counts towards the back-off
MAX_DELAY_S = 60.0
PR_SET_PDEATHSIG = 1


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == cuda_fatal.EXIT_CODE:
        return f"exit code {code}: a CUDA error poisoned a device context"
    return f"exit code {code}"


def restart_delay(quick_crashes: int) -> float:
    """No wait after an isolated crash; 1, 2, 4 .. 60 s while the server keeps crashing right after its start."""
    if quick_crashes <= 1:
        return 0.0
    return min(MAX_DELAY_S, 2.0 ** (quick_crashes - 2))


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


def say(message: str) -> None:
    print(f"comfy-parallel supervisor: {message}", file=sys.stderr, flush=True)


def run(serve_args: Sequence[str]) -> int:
    """Run ``comfy-parallel serve SERVE_ARGS`` until it exits cleanly or a signal asks the supervisor to stop."""
    command = [sys.executable, "-m", "comfy_parallel", "serve", *serve_args]
    stopping: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    starts = quick_crashes = 0
    while True:
        starts += 1
        started = time.monotonic()
        child = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)
        say(f"server started (pid {child.pid}, start {starts})")
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
        if stopping or code == 0:
            say(f"server stopped ({describe(code)})")
            return max(code, 0)
        if code in NO_RESTART_CODES:
            say(f"server exited with {describe(code)} ({NO_RESTART_CODES[code]}); not restarting")
            return code
        quick_crashes = quick_crashes + 1 if time.monotonic() - started < QUICK_CRASH_S else 1
        delay = restart_delay(quick_crashes)
        say(f"server crashed ({describe(code)}) after {time.monotonic() - started:.1f} s; restarting"
            + (f" in {delay:.0f} s" if delay else ""))
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not stopping:
            time.sleep(min(0.1, deadline - time.monotonic()))
        if stopping:
            say("stopped while waiting to restart")
            return 0
