"""The decode thread count: chosen from free cores, then by timing steps (slimlm/runtime/threads.py)."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.runtime.lean import RuntimeConfig
from slimlm.runtime.threads import ThreadTuner, free_cores, usable_cores


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    from slimlm.runtime.threads import set_threads

    set_threads(n)


def _drive(tuner, cost, steps):
    """Run `steps` steps whose time is cost[thread count]; the counts used, in order."""
    used = []
    for _ in range(steps):
        n = tuner.next()
        used.append(n)
        tuner.record(cost[n])
    return used


def test_free_cores_is_within_the_usable_ones_and_sees_a_busy_process():
    import subprocess
    import sys
    import time

    assert 1 <= free_cores() <= usable_cores()
    if usable_cores() < 2:
        pytest.skip("one usable core: nothing to take away")
    hog = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 20\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.3)
        assert free_cores() <= usable_cores() - 1
    finally:
        hog.kill()
        hog.wait()


def test_no_more_threads_than_free_cores_are_tried():
    free = [1]
    t = ThreadTuner(max_threads=2, probe=2, every=10, start=2, free=lambda: free[0])
    used = _drive(t, {1: 0.004, 2: 0.5}, 30)  # a busy neighbour: 2 threads would collapse
    assert t.chosen == 1 and 2 not in used
    free[0] = 2  # the neighbour is gone: the next probe tries 2 again
    used = _drive(t, {1: 0.006, 2: 0.004}, 30)
    assert 2 in used and t.chosen == 2


def test_the_faster_count_is_chosen_and_a_collapsed_one_costs_one_step():
    t = ThreadTuner(max_threads=2, probe=4, every=1000, start=1, free=lambda: 2)
    used = _drive(t, {1: 0.005, 2: 0.2}, 40)  # 2 threads collapsed (a busy process on the other core)
    assert t.chosen == 1
    assert used.count(2) == 1  # dropped after its first step: over twice the best
    t = ThreadTuner(max_threads=2, probe=4, every=1000, start=1, free=lambda: 2)
    _drive(t, {1: 0.006, 2: 0.004}, 40)
    assert t.chosen == 2 and torch.get_num_threads() == 2


def test_the_choice_is_measured_again_every_so_often():
    t = ThreadTuner(max_threads=2, probe=2, every=10, start=2, free=lambda: 2)
    _drive(t, {1: 0.006, 2: 0.004}, 20)
    assert t.chosen == 2
    used = _drive(t, {1: 0.004, 2: 0.05}, 30)  # the load changed: 2 threads now collapse
    assert t.chosen == 1 and used[-1] == 1


def test_one_core_has_nothing_to_tune():
    t = ThreadTuner(max_threads=1, start=1)
    assert _drive(t, {1: 0.01}, 5) == [1] * 5 and t.chosen == 1


def test_runtime_threads_are_checked():
    with pytest.raises(SlimlmError, match="threads must be at least 1"):
        RuntimeConfig(threads=0)


def test_lean_decode_runs_on_the_fixed_or_the_measured_count():
    from slimlm.models.tiny import tiny_model
    from slimlm.runtime.lean import LeanModel

    m = tiny_model("llama").model
    fixed = LeanModel(m, RuntimeConfig(threads=1))
    fixed.prefill([1, 2, 3])
    a = [fixed.step(t) for t in (4, 5, 6)]
    assert fixed.threads == 1 and fixed._tuner is None and torch.get_num_threads() == 1
    auto = LeanModel(m, RuntimeConfig())
    auto.prefill([1, 2, 3])
    b = [auto.step(t) for t in (4, 5, 6)]
    assert auto._tuner is not None and 1 <= auto.threads <= usable_cores()
    for x, y in zip(a, b):  # the thread count changes nothing but speed
        assert torch.allclose(x, y, atol=1e-4)
