"""Random page selections in the runtime's format, for the page-cache tests."""
import torch


def random_selection(gen: torch.Generator, n: int, h: int, k: int, num_pages: int) -> torch.Tensor:
    """[n, h, k] sorted distinct pages, -1 padded (ragged counts, some empty lists)."""
    out = torch.full((n, h, k), -1, dtype=torch.int32)
    for r in range(n):
        for hh in range(h):
            count = int(torch.randint(0, k + 1, (1,), generator=gen))
            out[r, hh, :count] = torch.randperm(num_pages, generator=gen)[:count].sort().values.to(torch.int32)
    return out
