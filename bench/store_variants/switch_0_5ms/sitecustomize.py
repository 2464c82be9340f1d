"""bench/crash_safe_queue.py --variant switch_0_5ms: a 0.5 ms GIL switch interval in the server process."""

import sys

sys.setswitchinterval(0.0005)
