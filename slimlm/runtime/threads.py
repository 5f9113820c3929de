"""How many threads the kernels use: chosen from the cores actually free, then by measurement.

A fixed OpenMP team collapses when another process is busy: on a 2-vCPU machine with one
competing busy process, 2 threads decode at 1–2 tokens/s (every parallel region waits for
the thread that shares its core with the other process) while 1 thread keeps most of its
speed. `ThreadTuner` therefore:

- counts the cores free now (`free_cores`: usable cores minus other processes' runnable
  tasks, read from /proc without waiting), at least 1, and never tries more threads than that;
- then times decode steps itself: each candidate count (1 .. free cores) runs `probe`
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


def _procs_running() -> int | None:
    """Runnable tasks on the whole machine now (/proc/stat), or None where there is no such file."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _own_running() -> int:
    """This process's threads that are runnable now (an OpenMP team spinning counts)."""
    n = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/stat") as f:
                st = f.read()
        except OSError:
            continue
        n += st[st.rindex(")") + 2] == "R"
    return max(n, 1)


def free_cores(samples: int = 3) -> int:
    """Cores not taken by other processes right now: usable cores minus the runnable tasks of others
    (the fewest over a few readings ~0.2 ms apart, so a passing task does not count), at least 1.
    Instantaneous, no sleep: a probe costs ~0.1 ms. Without /proc, all usable cores."""
    n = usable_cores()
    others = None
    for k in range(samples):
        total = _procs_running()
        if total is None:
            return n
        busy = max(0, total - _own_running())
        others = busy if others is None else min(others, busy)
        if k + 1 < samples:
            time.sleep(0.0002)
    return max(1, n - others)


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
                 setter=None, free=None):
        self.setter = setter or set_threads  # the torch-free runtime passes the extension's own
        self.free = free or free_cores
        self._max = max_threads or usable_cores()
        self.candidates = list(range(1, self._max + 1))
        self.probe, self.every = probe, every
        self.chosen = min(start, self._max) if start is not None else self._max
        self._times: dict[int, list[float]] = {}
        self._queue: list[int] = []
        self._since = 0
        self._current = None
        if self._max > 1:
            self._schedule()

    def _schedule(self) -> None:
        # only counts the free cores can take: a team larger than them collapses (one such step can cost
        # as much as a hundred good ones, so it is not even probed); the current choice first, and last
        # again (its first step after a change pays the wake-up)
        free = self.free()
        self.candidates = list(range(1, min(self._max, free) + 1))
        self.chosen = min(self.chosen, self.candidates[-1])
        if len(self.candidates) == 1:
            self._queue, self._times = [], {}
            return
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
        if self._since >= self.every and self._max > 1:
            self._since = 0
            self._schedule()
