import pytest
import torch

from offload.uploads import upload, upload_into


def test_upload_into_converts_to_the_buffers_dtype_and_refuses_other_shapes():
    dst = torch.full((3,), -1, dtype=torch.int32)
    assert upload_into(dst, torch.tensor([7, 8, 9], dtype=torch.int64)) is dst
    assert dst.tolist() == [7, 8, 9] and dst.dtype == torch.int32
    with pytest.raises(ValueError, match=r"shape \(2,\) into a buffer of shape \(3,\)"):
        upload_into(dst, torch.tensor([1, 2]))


@pytest.mark.gpu
def test_cuda_uploads_never_wait_for_the_device():
    """Queued behind a busy stream, neither upload makes the host wait (the debug mode raises on
    a synchronising copy), and both land in stream order."""
    busy = torch.randn(4096, 4096, device="cuda")
    dst = torch.zeros(2, 3, dtype=torch.int32, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            busy = busy @ busy / 64
        fresh = upload(torch.arange(6).view(2, 3), "cuda")
        upload_into(dst, torch.arange(6, 12).view(2, 3))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fresh.tolist() == [[0, 1, 2], [3, 4, 5]] and dst.tolist() == [[6, 7, 8], [9, 10, 11]]
