"""Facts about this process that benchmarks report: its peak resident memory."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own address space, in bytes.

    Linux: VmHWM from /proc/self/status. Not ru_maxrss, which the kernel carries over an exec from
    the parent's address space, so a process started by a larger one would report at least the
    parent's size. Elsewhere ru_maxrss (kB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)
