"""Benchmarks of the kernels, the transfers and the runtime; each writes JSON under $OUT."""

from __future__ import annotations

import os


def kernels_source() -> str:
    """The folder the `gpu_kernels` package was imported from. The GPU benchmarks print it and save
    it, so a run against another copy of the kernels says which copy ran: `python -m` and `python
    -c` put the working directory ahead of PYTHONPATH, so an A/B that puts a copy first on
    PYTHONPATH must run with `python -P` (benchmarks/RESULTS.md, 2026-12-06, eighteenth session)."""
    import gpu_kernels

    return os.path.dirname(os.path.abspath(gpu_kernels.__file__))
