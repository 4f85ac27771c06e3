"""Host arrays to the device without the host waiting for the device.

A copy from pageable host memory makes the host wait until the stream has run it: a plan that
uploads that way drains the GPU's queue before every pass, and the GPU idles while Python plans
the next one. Staged in pinned memory, the copy is queued like a kernel. The caching host
allocator keeps a staging buffer until its copy has run, then reuses it; the cache stays bounded
by the uploads in flight, at most one block's, since the loop waits for each block's tokens.
Every host-to-device index upload of the runtime goes through these two functions.
"""

from __future__ import annotations

import torch


def upload(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`host` (CPU) as a new tensor on `device`, queued on the current stream."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def upload_into(dst: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """Copy `host` (CPU, dst's shape, any dtype) into the device buffer `dst` (fixed addresses a
    captured graph reads), queued on the current stream. Returns dst."""
    if host.shape != dst.shape:
        raise ValueError(f"upload of shape {tuple(host.shape)} into a buffer of shape {tuple(dst.shape)}")
    if not dst.is_cuda:
        return dst.copy_(host)
    # converted on the host first: torch converts a cross-device copy's dtype in an unpinned temporary
    return dst.copy_(host.to(dst.dtype).pin_memory(), non_blocking=True)
