"""The transfer benchmark's overlap part as a CPU dry run (the Triton interpreter; its numbers mean
nothing): every triplet of passes runs, the pages land bit for bit, and the JSON carries the per-triplet
end-to-end shares and the SM-tax model."""
import json
import os
import statistics

import pytest
import torch

from benchmarks.transfer import main, sm_tax_hidden

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run; the GPU runs it for real")


def test_overlap_only_dry_run(tmp_path, capsys):
    assert main(["--device", "cpu", "--quick", "--overlap-only", "--overlap-caps", "1", "0", "--layers", "2",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "transfer.json").read_text())
    assert "gather" not in data and "write" not in data
    import gpu_kernels  # the run says which copy of the kernels it ran
    assert data["gpu_kernels"] == os.path.dirname(os.path.abspath(gpu_kernels.__file__))
    cases = data["overlap"]["cases"]
    # caps 1 and 0 (the standalone grid: 2 programs per SM of the dry run's 2), for both
    # compute/transfer ratios (the CPU has no stream priorities, so no default-priority row)
    assert sorted((c["case"], c["max_programs"]) for c in cases) == sorted(
        (case, cap) for case in ("compute>transfer", "compute<transfer") for cap in (1, 4))
    for c in cases:
        assert c["ok"], "a fetched page differs from the host store"
        # --quick runs two (compute-only, compute + fetch, fetch-only) triplets per row, and each
        # end-to-end share is against its own triplet's fetch-only time
        assert len(c["hidden_fraction_e2e_runs"]) == len(c["transfer_alone_runs"]) == 2
        assert all(a > 0 for a in c["transfer_alone_runs"])
        assert c["transfer_alone_per_layer_ms"] == pytest.approx(statistics.median(c["transfer_alone_runs"]))
        assert c["sm_tax_model_e2e"] == sm_tax_hidden(c["max_programs"], 2)
    assert "e2e hid" in capsys.readouterr().out


def test_sm_tax_model():
    assert sm_tax_hidden(8, 132) == pytest.approx(1 - 8 / 132)
    assert sm_tax_hidden(264, 132) == 0.0  # two programs per SM: every SM is the gather's
    assert sm_tax_hidden(200, 132) == 0.0


def test_overlap_weight_read_compute_dry_run(tmp_path):
    """--overlap-compute matmul weight-read: every cap runs beside both stand-ins, each row says which."""
    assert main(["--device", "cpu", "--quick", "--overlap-only", "--overlap-caps", "4", "--layers", "2",
                 "--overlap-compute", "matmul", "weight-read", "--out", str(tmp_path)]) == 0
    cases = json.loads((tmp_path / "transfer.json").read_text())["overlap"]["cases"]
    assert sorted((c["compute_kind"], c["case"]) for c in cases) == sorted(
        (kind, case) for kind in ("matmul", "weight-read") for case in ("compute>transfer", "compute<transfer"))
    weight = [c for c in cases if c["compute_kind"] == "weight-read"]
    assert all(c["ok"] and c["matmul"]["rows"] == 64 and c["matmul"]["cols"] > 0 for c in weight)
