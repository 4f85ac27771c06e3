"""Device time of one call, with the host's work to enqueue it off the clock.

A call timed between two CUDA events on an idle GPU also counts the host's launch work: the start
event completes at once and the GPU then waits for the call to be enqueued. A pipeline that enqueues
its transfers and kernels ahead (herald's side-stream gathers, a replayed decoding step) never pays
that wait, and for a 0.5 ms page gather it was 5-25% of the time (67-137 us of Python and launch
work per call on the lent H100 hosts). So the stream is first kept busy with a GPU busy-wait; the start event completes
when it ends, by which time the call is already queued behind it.
"""

from __future__ import annotations

from typing import Callable

import torch

# About 0.5 ms at a 2 GHz SM clock; doubled whenever the host was still enqueueing when it ended.
FIRST_BUSY_WAIT_CYCLES = 1_000_000
# About 32 ms. A call still launching after that is not a kernel launch: most likely it waits for
# the device itself (a pageable copy, a .item()), which no busy-wait can hide.
MAX_BUSY_WAIT_CYCLES = FIRST_BUSY_WAIT_CYCLES << 6


class BusyWaitTimer:
    """Times calls on the current CUDA stream behind a busy-wait long enough to cover their launch.

    After enqueueing the call, the timer asks whether the start event has already completed; if it
    has, the busy-wait ended while the host was still launching (part of that work is on the clock),
    so it doubles the busy-wait and times that repetition again. ``busy_wait_cycles`` keeps the
    length that sufficed.
    """

    def __init__(self, busy_wait_cycles: int = FIRST_BUSY_WAIT_CYCLES) -> None:
        self.busy_wait_cycles = busy_wait_cycles
        self.retries = 0

    def __call__(self, fn: Callable[[], object], before: Callable[[], object] | None = None) -> float:
        """Milliseconds of device time from the start of fn's first GPU work to the end of its last.
        ``before`` runs first, off the clock (e.g. an L2 flush)."""
        while True:
            if before is not None:
                before()
            torch.cuda._sleep(self.busy_wait_cycles)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            launch_on_clock = start.query()
            end.record()
            end.synchronize()
            if not launch_on_clock:
                return start.elapsed_time(end)
            if self.busy_wait_cycles >= MAX_BUSY_WAIT_CYCLES:
                raise RuntimeError(f"the call was still being enqueued after a {self.busy_wait_cycles}-cycle GPU "
                                   "busy-wait: it probably waits for the device (a sync, a pageable copy); time it "
                                   "with its launch included instead")
            self.busy_wait_cycles *= 2
            self.retries += 1
