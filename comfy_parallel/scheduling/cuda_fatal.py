"""CUDA errors that poison a device context, and ending the process when one happens.

After an illegal memory access, a device-side assert, an uncorrectable ECC error or a lost GPU (Xid), every later
CUDA call in the process fails or returns garbage: the context is "sticky" broken and cannot be reset from inside
the process. With one process for every GPU, limping on would fail every prompt on that device (and often on the
others, through shared allocator state). So the process ends with its own exit code (``EXIT_CODE``); the supervisor
(``serve --supervise``) or systemd starts it again with fresh contexts, and the write-ahead queue runs the prompt
that hit the error once more (a second time in a row is recorded as an error, ``recovery.py``).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("comfy_parallel")

EXIT_CODE = 75  # EX_TEMPFAIL: "try again" -- a restart recovers the device

# Lower-case fragments of the messages torch/CUDA give for errors that leave the context unusable.
POISONING_MESSAGES = (
    "illegal memory access",
    "device-side assert",
    "uncorrectable ecc error",
    "unspecified launch failure",
    "an illegal instruction was encountered",
    "misaligned address",
    "gpu has fallen off the bus",
    "cudaerrorlaunchfailure",
    "cudaerrorillegaladdress",
    "cudaerrorassert",
    "cudaerrorecc",
    "xid",
)


def poisoning_text(text: str) -> str | None:
    """The fragment of ``text`` that names a context-poisoning CUDA error, or ``None``."""
    low = text.lower()
    if "cuda" not in low and "xid" not in low:
        return None
    for fragment in POISONING_MESSAGES:
        if fragment == "xid":
            if "xid " in low or "xid:" in low:
                return fragment
        elif fragment in low:
            return fragment
    return None


def poisoning_error(status: dict | None) -> str | None:
    """The ``execution_error`` message of a finished prompt if it names a context-poisoning CUDA error."""
    for event, data in (status or {}).get("messages", []):
        if event != "execution_error" or not isinstance(data, dict):
            continue
        message = f"{data.get('exception_type', '')}: {data.get('exception_message', '')}"
        if poisoning_text(message) is not None:
            return message.strip()
    return None


def exit_process(index: int, prompt_id: str, reason: str) -> None:
    """End the process now, from whichever thread saw the error; the prompt stays in the write-ahead queue."""
    log.critical("[GPU %d] prompt %s hit a CUDA error that poisons the device context (%s); exiting with code %d "
                 "so that a restart brings every device back", index, prompt_id, reason.splitlines()[0][:300],
                 EXIT_CODE)
    for handler in logging.getLogger().handlers + log.handlers:
        try:
            handler.flush()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CODE)
