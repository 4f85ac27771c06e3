"""What the device and the installed Triton can do beyond plain launches (Hopper features).

Each check is cached per device: it asks the driver once, and kernels consult it on every launch.
"""
from __future__ import annotations

import dataclasses
import functools

import torch


def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on `device` can be launched as programmatic dependents (PDL): a CUDA device
    of compute capability 9.0+ (griddepcontrol) and a Triton whose launcher takes launch_pdl."""
    if not _hopper(device):
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}
