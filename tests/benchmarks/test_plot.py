import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="plots need the bench extra (pip install -e .[bench])")
from benchmarks.plot import main  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"


def assert_png(path: Path) -> None:
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_plots_from_recorded_runs(tmp_path):
    """The committed JSON of real runs still plots: throughput by context (several files merged)
    and the gather with its zero-copy ceiling."""
    runs = ["throughput_32k_64k_h200_batch12_session5.json", "throughput_128k_h200_step0_fix_1.json"]
    assert main(["--throughput", *[str(DATA / r) for r in runs], "--scaling", *[str(DATA / r) for r in runs],
                 "--transfer", str(DATA / "transfer_h200_contiguous_2.json"), "--out", str(tmp_path)]) == 0
    for name in ("throughput_by_context.png", "throughput_scaling.png", "transfer.png"):
        assert_png(tmp_path / name)
    assert {r["context"] for run in runs for r in json.loads((DATA / run).read_text())["rows"]} == {32768, 65536, 131072}


def test_sparse_and_overlap_plots_from_recorded_runs(tmp_path):
    """The ninth session's kernels runs (N=1 and batch 6, with the launch floor) plot against their
    attainable rate, and the runtime's side fetch by program cap (an overlap-only transfer run); a
    transfer run without gather rows is refused by the gather plot with a message naming --overlap."""
    kernels = [str(DATA / f) for f in ("kernels_sparse_n1_h200_floor.json", "kernels_sparse_batch6_h200_floor.json")]
    overlap = str(DATA / "transfer_overlap_h100_runtime_path.json")
    assert main(["--sparse", *kernels, "--overlap", overlap, "--out", str(tmp_path)]) == 0
    for name in ("sparse_attainable.png", "overlap.png"):
        assert_png(tmp_path / name)
    with pytest.raises(ValueError, match="--overlap"):
        main(["--transfer", overlap, "--out", str(tmp_path)])


def test_split_path_plot_from_recorded_runs(tmp_path):
    """The tenth session's kernels runs plot their split-path variants; a run without them is
    refused with a message naming what is missing."""
    kernels = [str(DATA / f) for f in ("kernels_sparse_n1_h200_split_path.json",
                                        "kernels_sparse_batch6_h200_split_path.json")]
    assert main(["--split-path", *kernels, "--out", str(tmp_path)]) == 0
    assert_png(tmp_path / "sparse_split_path.png")
    with pytest.raises(ValueError, match="split_path"):
        main(["--split-path", str(DATA / "kernels_sparse_n1_h200_floor.json"), "--out", str(tmp_path)])


def test_sparse_plot_with_a_layer_run_beside_runs_without(tmp_path):
    """A run with the layer run and its floor (seventeenth session) plots both bars; a run with the
    layer run only (fourteenth) and rows of an older run without it, in the same plot, get zero bars
    rather than an error."""
    kernels = [str(DATA / f) for f in ("kernels_n1_h100_s17_layer_floor.json",
                                        "kernels_sparse_batch6_h200_layer_run_qreg_reverted.json",
                                        "kernels_sparse_n1_h200_floor.json")]
    sparse_rows = [r for r in json.loads(Path(kernels[0]).read_text())["rows"] if r["mode"].startswith("sparse")]
    assert "layers_attainable_TBps" in sparse_rows[0]
    assert "layers_TBps" in json.loads(Path(kernels[1]).read_text())["rows"][0]
    assert main(["--sparse", *kernels, "--out", str(tmp_path)]) == 0
    assert_png(tmp_path / "sparse_attainable.png")


def test_prefetch_pages_plot_from_a_recorded_run(tmp_path):
    """The nineteenth session's --prefetch-pages run plots one line per sparse row; a run made
    without that option is refused, naming it."""
    run = DATA / "kernels_n1_h100_s19_prefetch_pages.json"
    rows = [r for r in json.loads(run.read_text())["rows"] if "layers_ms_by_prefetch_pages" in r]
    assert len(rows) == 8 and sorted(rows[0]["layers_ms_by_prefetch_pages"], key=int) == ["0", "1", "2", "4", "8",
                                                                                           "16", "64"]
    assert main(["--prefetch-pages", str(run), "--out", str(tmp_path)]) == 0
    assert_png(tmp_path / "sparse_prefetch_pages.png")
    with pytest.raises(ValueError, match="--prefetch-pages"):
        main(["--prefetch-pages", str(DATA / "kernels_n1_h100_s18_final.json"), "--out", str(tmp_path)])


def test_sparse_kernels_plot_from_recorded_runs(tmp_path):
    """The fifteenth session's H100 runs (batch 6 and N=1, both kernels in each sweep) plot each row's best
    Triton and warp-specialised variant; a run without the second kernel is refused naming it."""
    kernels = [str(DATA / f) for f in ("kernels_sparse_batch6_h100_ws.json", "kernels_sparse_n1_h100_ws.json")]
    assert main(["--sparse-kernels", *kernels, "--out", str(tmp_path)]) == 0
    assert_png(tmp_path / "sparse_kernels.png")
    with pytest.raises(ValueError, match="warp_specialized"):
        main(["--sparse-kernels", str(DATA / "kernels_sparse_n1_h200_floor.json"), "--out", str(tmp_path)])

