"""The CUDA streams the runtime's work runs on, and the one rule for their priorities.

Herald's lookahead runs a whole pass beside the block's remaining steps; its gathers hold SMs while
they wait on PCIe. The block scheduler favours higher-priority streams when it places new thread
blocks, so the order is: the passes (compute) above the lookahead's gathers above the lookahead's
own compute. The gathers sit above the side pass's compute because each layer's gather would
otherwise queue behind the next layers' selection; they sit below the passes so a transfer only
takes the SMs the passes leave idle. Without priorities (`prioritize=False`) the passes run on the
caller's stream and both side streams at the lowest priority (torch's default).

One set per engine, reused by every mode and loop it makes: cuBLAS keeps a workspace per stream it
has run on for the life of the process, so fresh streams per request batch would grow GPU memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Streams:
    """compute: where the passes run (None: the caller's stream); lookahead: herald's side pass;
    gather: the side pass's gathers."""

    compute: torch.cuda.Stream | None
    lookahead: torch.cuda.Stream
    gather: torch.cuda.Stream


def make_streams(device: torch.device, prioritize: bool = True) -> Streams:
    """The runtime's streams on a CUDA `device`, prioritised by the rule of the module docstring."""
    lowest, highest = torch.cuda.Stream.priority_range()  # numerically: lowest >= highest
    middle = (lowest + highest) // 2 if prioritize else lowest
    return Streams(compute=torch.cuda.Stream(device, priority=highest) if prioritize else None,
                   lookahead=torch.cuda.Stream(device, priority=lowest),
                   gather=torch.cuda.Stream(device, priority=middle))
