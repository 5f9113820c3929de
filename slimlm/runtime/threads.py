"""How many threads the kernels use: chosen from the cores actually free, then by measurement.

A fixed OpenMP team collapses when another process is busy: on a 2-vCPU machine with one
competing busy process, 2 threads decode at 1–2 tokens/s (every parallel region waits for
the thread that shares its core with the other process) while 1 thread keeps most of its
speed. `ThreadTuner` therefore:

- starts from the cores free now (`free_cores`: /proc/stat's idle share over ~50 ms, of the
  cores this process may use), at least 1;
- then times decode steps itself: each candidate count (1 .. usable cores) runs `probe`
  steps (a candidate whose step takes over twice the best step so far is dropped after
  that one step, so a collapsed team costs one slow step, not four), the one with the
  lowest median step time is kept, and the probe is repeated every `every` steps so a
  change of load is followed.

The kernels and torch share libgomp's thread pool, so one call sets both. Explicit counts
(`--threads N`) bypass it.
"""

from __future__ import annotations

import os
import statistics
import time


def usable_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, float] | None:
    try:
        with open("/proc/stat") as f:
            v = [float(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
    return sum(v[:8]), idle


def free_cores(window: float = 0.05) -> int:
    """Cores idle over the next `window` seconds (rounded, at least 1, at most `usable_cores()`)."""
    n = usable_cores()
    a = _cpu_times()
    if a is None:
        return n
    time.sleep(window)
    b = _cpu_times()
    total, idle = b[0] - a[0], b[1] - a[1]
    if total <= 0:
        return n
    busy = (os.cpu_count() or n) * (1 - idle / total)  # cores' worth of busy time, all CPUs
    return max(1, min(n, round(n - busy + 0.25)))


def set_threads(n: int) -> None:
    """The kernels' and torch's thread count (one libgomp pool)."""
    import torch

    from slimlm.kernels import extension

    torch.set_num_threads(n)
    ext = extension()
    if ext is not None:
        ext.threads(n)


class ThreadTuner:
    """Picks the thread count for decode steps by timing them (see the module docstring).

    Use: `n = tuner.next()` before a step (the count is already set), `tuner.record(seconds)`
    after it. `chosen` is the count in force outside a probe."""

    def __init__(self, max_threads: int | None = None, probe: int = 4, every: int = 256, start: int | None = None,
                 setter=None):
        self.setter = setter or set_threads  # the torch-free runtime passes the extension's own
        self.candidates = list(range(1, (max_threads or usable_cores()) + 1))
        self.probe, self.every = probe, every
        self.chosen = start if start is not None else free_cores()
        self._times: dict[int, list[float]] = {}
        self._queue: list[int] = []
        self._since = 0
        self._current = None
        if len(self.candidates) > 1:
            self._schedule()

    def _schedule(self) -> None:
        # the current choice first: its first step after a pause pays the wake-up, so it is timed last too
        order = [self.chosen] + [c for c in self.candidates if c != self.chosen]
        self._queue = [c for c in order for _ in range(self.probe)] + [self.chosen] * self.probe
        self._times = {c: [] for c in self.candidates}

    def next(self) -> int:
        n = self._queue[0] if self._queue else self.chosen
        if n != self._current:
            self.setter(n)
            self._current = n
        return n

    def record(self, seconds: float) -> None:
        if self._queue:
            c = self._queue.pop(0)
            others = [min(t) for k, t in self._times.items() if t and k != c]
            self._times[c].append(seconds)
            if others and seconds > 2 * min(others):  # clearly worse (e.g. a core taken): one step says so
                self._queue = [k for k in self._queue if k != c]
            if not self._queue:
                med = {c: statistics.median(t) for c, t in self._times.items() if t}
                self.chosen = min(med, key=med.get)
                self._since = 0
            return
        self._since += 1
        if self._since >= self.every and len(self.candidates) > 1:
            self._schedule()
