"""Zero-copy access to pinned host memory from Triton kernels (unified virtual addressing).

Triton turns any argument that has ``data_ptr()`` and ``dtype`` into a pointer and asks the CUDA
driver for its device address. Pinned (page-locked, mapped) host memory has one, so a kernel can
load from and store to it directly over PCIe without a staging copy. Triton refuses plain CPU
tensors (and would read garbage through an unmapped address), so host tensors go in through
``HostPointer``, which only accepts pinned memory.

Memory page-locked in place with ``cudaHostRegister`` (MAPPED flag) is as reachable as torch's pinned
allocations, but ``tensor.is_pinned()`` does not report it on every torch version (2.11 says False).
Its owner, who registered it, vouches for it with ``HostPointer(view, registered=True)``.

Under the Triton interpreter (no CUDA, ``TRITON_INTERPRET=1``) kernels need real torch tensors, so
``kernel_arg`` leaves CPU tensors untouched when CUDA is absent.
"""

from __future__ import annotations

import torch


class HostPointer:
    """A pinned host tensor presented to Triton as a device pointer (read/written through UVA).

    Holds a reference to the tensor so its memory outlives the launch that uses the pointer.
    ``registered=True``: the caller guarantees the memory is page-locked and mapped into the device
    address space (cudaHostRegister with the MAPPED flag), so the ``is_pinned()`` check, which
    does not see registered memory, is skipped. A wrong guarantee makes the kernel fault.
    """

    def __init__(self, tensor: torch.Tensor, *, registered: bool = False) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(f"HostPointer wraps host tensors; got a tensor on {tensor.device}")
        if not registered and not tensor.is_pinned():
            raise ValueError(
                "HostPointer needs pinned host memory: a GPU kernel cannot reach pageable memory. "
                "Allocate with pin_memory=True (or tensor.pin_memory()); for memory page-locked with "
                "cudaHostRegister (MAPPED), pass registered=True."
            )
        self.tensor = tensor
        self.dtype = tensor.dtype
        self.registered = registered

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


def host_tensor(x: torch.Tensor | HostPointer) -> torch.Tensor:
    """The tensor behind ``x``: a HostPointer's host tensor, or ``x`` itself (for shape/device checks)."""
    return x.tensor if isinstance(x, HostPointer) else x


def needs_gpu_launch(*tensors: torch.Tensor | HostPointer) -> bool:
    """True when a kernel over these tensors runs on a GPU (any is on CUDA, or CUDA is present)."""
    if any(host_tensor(t).is_cuda for t in tensors):
        return True
    return torch.cuda.is_available()


def kernel_arg(tensor: torch.Tensor | HostPointer, name: str, gpu_launch: bool) -> torch.Tensor | HostPointer:
    """Return what to pass to a Triton kernel for ``tensor``.

    - A ``HostPointer`` passes through unchanged on a GPU launch (its creator vouched for the
      memory); on an interpreter launch its tensor is passed, as the interpreter needs real tensors.
    - CUDA tensors pass through.
    - Host tensors pass through when the launch is not a GPU launch (the Triton interpreter).
    - For a GPU launch, pinned host tensors are wrapped in ``HostPointer`` (zero-copy UVA);
      pageable host tensors are refused with an error naming the argument.
    """
    if isinstance(tensor, HostPointer):
        return tensor if gpu_launch else tensor.tensor
    if tensor.is_cuda or not gpu_launch:
        return tensor
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}; expected a CUDA tensor or pinned host tensor")
    if not tensor.is_pinned():
        raise ValueError(
            f"{name} is a pageable host tensor (shape {tuple(tensor.shape)}); a GPU kernel can only read/write "
            "host memory that is pinned. Pin it (tensor.pin_memory(), HostKVStore(pin_memory=True)) or move it "
            "to the GPU; memory registered with cudaHostRegister goes in as HostPointer(t, registered=True) "
            "(HostKVStore.kernel_k/kernel_v)."
        )
    return HostPointer(tensor)


def launch_device(*tensors: torch.Tensor | HostPointer) -> torch.device:
    """The CUDA device a GPU launch over these tensors runs on (the first CUDA tensor's, else current)."""
    for t in tensors:
        t = host_tensor(t)
        if t.is_cuda:
            return t.device
    return torch.device("cuda", torch.cuda.current_device())


def as_kernel_arg(tensor: torch.Tensor | HostPointer, name: str = "tensor") -> torch.Tensor | HostPointer:
    """``kernel_arg`` deciding the launch kind from the tensor alone: a host tensor is wrapped when CUDA
    is present (pinned -> ``HostPointer``, pageable -> error) and passed as is without CUDA; a
    ``HostPointer`` is returned as is when CUDA is present."""
    return kernel_arg(tensor, name, needs_gpu_launch(tensor))
