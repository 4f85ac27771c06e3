"""Zero-copy access to pinned host memory from Triton kernels (unified virtual addressing).

Triton turns any argument that has ``data_ptr()`` and ``dtype`` into a pointer and asks the CUDA
driver for its device address. Pinned (page-locked, mapped) host memory has one, so a kernel can
load from and store to it directly over PCIe without a staging copy. Triton refuses plain CPU
tensors (and would read garbage through an unmapped address), so host tensors go in through
``HostPointer``, which only accepts pinned memory.

Under the Triton interpreter (no CUDA, ``TRITON_INTERPRET=1``) kernels need real torch tensors, so
``kernel_arg`` leaves CPU tensors untouched when CUDA is absent.
"""

from __future__ import annotations

import torch


class HostPointer:
    """A pinned host tensor presented to Triton as a device pointer (read/written through UVA).

    Holds a reference to the tensor so its memory outlives the launch that uses the pointer.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(f"HostPointer wraps host tensors; got a tensor on {tensor.device}")
        if not tensor.is_pinned():
            raise ValueError(
                "HostPointer needs pinned host memory: a GPU kernel cannot reach pageable memory. "
                "Allocate with pin_memory=True (or tensor.pin_memory())."
            )
        self.tensor = tensor
        self.dtype = tensor.dtype

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def stride(self, dim: int | None = None):
        return self.tensor.stride() if dim is None else self.tensor.stride(dim)

    def size(self, dim: int | None = None):
        return self.tensor.size() if dim is None else self.tensor.size(dim)

    def element_size(self) -> int:
        return self.tensor.element_size()

    def numel(self) -> int:
        return self.tensor.numel()

    def __repr__(self) -> str:
        return f"HostPointer(shape={tuple(self.tensor.shape)}, dtype={self.dtype}, ptr=0x{self.data_ptr():x})"


def needs_gpu_launch(*tensors: torch.Tensor) -> bool:
    """True when a kernel over these tensors runs on a GPU (any is on CUDA, or CUDA is present)."""
    if any(t.is_cuda for t in tensors):
        return True
    return torch.cuda.is_available()


def kernel_arg(tensor: torch.Tensor, name: str, gpu_launch: bool) -> torch.Tensor | HostPointer:
    """Return what to pass to a Triton kernel for ``tensor``.

    - CUDA tensors pass through.
    - Host tensors pass through when the launch is not a GPU launch (the Triton interpreter).
    - For a GPU launch, pinned host tensors are wrapped in ``HostPointer`` (zero-copy UVA);
      pageable host tensors are refused with an error naming the argument.
    """
    if tensor.is_cuda or not gpu_launch:
        return tensor
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}; expected a CUDA tensor or pinned host tensor")
    if not tensor.is_pinned():
        raise ValueError(
            f"{name} is a pageable host tensor (shape {tuple(tensor.shape)}); a GPU kernel can only read/write "
            "host memory that is pinned. Pin it (tensor.pin_memory(), HostKVStore(pin_memory=True)) or move it "
            "to the GPU."
        )
    return HostPointer(tensor)


def launch_device(*tensors: torch.Tensor) -> torch.device:
    """The CUDA device a GPU launch over these tensors runs on (the first CUDA tensor's, else current)."""
    for t in tensors:
        if t.is_cuda:
            return t.device
    return torch.device("cuda", torch.cuda.current_device())


def as_kernel_arg(tensor: torch.Tensor, name: str = "tensor") -> torch.Tensor | HostPointer:
    """``kernel_arg`` deciding the launch kind from the tensor alone: a host tensor is wrapped when CUDA
    is present (pinned -> ``HostPointer``, pageable -> error) and passed as is without CUDA."""
    return kernel_arg(tensor, name, needs_gpu_launch(tensor))
