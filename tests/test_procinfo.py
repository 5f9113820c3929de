"""Peak RSS as benchmarks report it: the process's own, not what it inherited over an exec."""

import subprocess
import sys

import numpy as np

from slimlm.procinfo import peak_rss_bytes

CHILD = "from slimlm.procinfo import peak_rss_bytes; import resource; print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"


def test_a_child_of_a_large_process_reports_its_own_peak():
    big = np.ones(300 * 2**20 // 8)  # 300 MiB touched in this process before it starts the child
    assert peak_rss_bytes() > 300 * 2**20
    own, inherited = map(int, subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                                             check=True).stdout.split())
    del big
    assert own < 150 * 2**20  # a bare Python with numpy-free imports: tens of MB
    # ru_maxrss would have said at least the parent's size on Linux (kept across exec); it is not used
    assert inherited >= own
