"""benchmarks.timing on a GPU: a call's slow host launch work stays off the clock, and a call that
waits for the device is refused rather than timed wrong."""
import time

import pytest
import torch

from benchmarks.timing import FIRST_BUSY_WAIT_CYCLES, BusyWaitTimer

pytestmark = pytest.mark.gpu


def test_host_launch_work_is_off_the_clock_and_the_busy_wait_grows_to_cover_it():
    x = torch.zeros(1 << 20, device="cuda")

    def slow_launch():
        time.sleep(0.004)  # 4 ms of host work before the kernel is enqueued: longer than the first busy-wait
        x.add_(1)

    timer = BusyWaitTimer()
    times = [timer(slow_launch) for _ in range(5)]
    # each retry doubled the busy-wait, and the timer kept the length that sufficed
    assert timer.retries >= 1 and timer.busy_wait_cycles == FIRST_BUSY_WAIT_CYCLES * 2 ** timer.retries
    # one elementwise add over 4 MB takes microseconds; with the host's 4 ms on the clock it would be > 4 ms
    assert max(times) < 1.0, times
    # the start event waited for the busy-wait, not for the host: the event pair still brackets the add
    torch.cuda.synchronize()
    assert float(x[0]) == 5 + timer.retries


def test_before_runs_off_the_clock_every_repetition():
    flushes = []
    buf = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    timer = BusyWaitTimer()
    ms = timer(lambda: None, before=lambda: (flushes.append(1), buf.zero_()))
    assert len(flushes) == 1 + timer.retries
    assert ms < 0.05  # nothing was timed but two events back to back: the 64 MB memset is not in it


def test_a_call_that_waits_for_the_device_is_refused():
    timer = BusyWaitTimer()
    with pytest.raises(RuntimeError, match="waits for the device"):
        timer(torch.cuda.synchronize)
