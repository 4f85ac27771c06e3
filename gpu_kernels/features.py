"""What the device and the installed Triton can do beyond plain launches (Hopper features).

Each check is cached per device: it asks the driver once, and kernels consult it on every launch.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

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


@functools.lru_cache(maxsize=None)
def warp_specialized_supported(device: torch.device) -> bool:
    """Whether `device` runs `paged_attention_ws`'s Gluon kernel: an sm_90 GPU (its MMAs are wgmma,
    which Blackwell does not have) and a Triton whose Gluon takes the partition list that kernel is
    written against (3.6+)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
    except ImportError:
        return False
    return "functions_and_args" in inspect.signature(gl.warp_specialize).parameters
