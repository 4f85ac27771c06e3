"""The kernel benchmark's bound for a sparse call: the replay floor of as many kernels as the call
launches (the split merge is a second one) plus its bytes at the measured HBM read rate (the copy
rate for runs that did not measure reads)."""
import pytest

from benchmarks.kernels import attainable_fields

LIMITS = dict(hbm_copy_rw_GBps=4000.0, launch_floor=dict(graph_1_kernel_ms=0.0035, graph_2_kernels_ms=0.005))


@pytest.mark.parametrize("splits, floor", [(1, 0.0035), (16, 0.005)])
def test_attainable_counts_the_merge_kernel(splits, floor):
    rec = dict(kv_bytes=40_000_000, read_bytes=40_000_000, graph_ms=0.03, graph_best=dict(num_splits=splits))
    got = attainable_fields(rec, LIMITS)
    best_ms = floor + 40_000_000 / 4e9  # 10 us of streaming at 4 TB/s
    assert got["floor_ms"] == floor
    assert got["attainable_ms"] == pytest.approx(best_ms)
    assert got["attainable_TBps"] == pytest.approx(40e6 / best_ms / 1e9)
    assert got["frac_of_attainable"] == pytest.approx(best_ms / 0.03)


def test_attainable_streams_at_the_read_rate_when_measured():
    rec = dict(kv_bytes=40_000_000, read_bytes=50_000_000, graph_ms=0.03, graph_best=dict(num_splits=16))
    got = attainable_fields(rec, dict(LIMITS, hbm_read_GBps=5000.0))
    assert got["attainable_ms"] == pytest.approx(0.005 + 50_000_000 / 5e9)  # read bytes at 5 TB/s
    assert got["attainable_TBps"] == pytest.approx(40e6 / got["attainable_ms"] / 1e9)  # over K+V bytes


def test_no_graph_no_bound():
    assert attainable_fields(dict(kv_bytes=1, ms=0.1), LIMITS) == {}


@pytest.mark.gpu
@pytest.mark.parametrize("t, cfg", [(16, dict(block_n=64, num_warps=4, num_stages=3, num_splits=2)),
                                    (32, dict(block_m=64, block_n=64, num_warps=4, num_stages=3, num_splits=3))],
                         ids=["T16-one-row-block", "T32-two-row-blocks"])
def test_layer_run_times_every_layer_and_checks_each_output(t, cfg):
    """The layer run replays one graph of calls, each over its own copy of the pool; every copy
    must produce the reference output (bf16 partials and output: 1e-2 relative); the same graph of
    empty kernels, its floor, is faster. Where the attention is chained (with PDL: one or two row
    blocks of GPU-resident pages), the same graph without its L2 prefetch is timed too, and checked
    the same way, and so is each count of prefetch_pages asked for."""
    import torch

    from benchmarks.kernels import Shape, Timer, layer_run_fields
    from gpu_kernels.paged_attention import paged_attention_reference

    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    sh = Shape(t, 4096, 16, gen, dev)
    n_sel = 13  # ragged: not a whole 64-token tile
    table = torch.randperm(sh.num_pages, device=dev, generator=gen)[:n_sel * 8].int().reshape(1, 8, n_sel)
    k_pool, v_pool = sh.k[:, 0].contiguous(), sh.v[:, 0].contiguous()
    kv_len = torch.full((1, 8), n_sel * 16 - 5, dtype=torch.int32, device=dev)
    ref = paged_attention_reference(sh.q, k_pool, v_pool, table, kv_len, scale=sh.scale)[0].float()
    got = layer_run_fields(Timer(warmup_ms=1, rep_ms=1), sh, (k_pool, v_pool, table, kv_len), cfg, n_sel,
                           nbytes=1_000_000, ref=ref, layers=3, prefetch_pages=(0, 2, 1000))
    assert got["layers"] == 3
    assert got["layers_ms"] > 0
    assert got["layers_TBps"] == pytest.approx(1e6 / got["layers_ms"] / 1e9)
    assert got["layers_rel_err"] < 1e-2
    assert 0 < got["layers_floor_ms"] < got["layers_ms"]  # empty calls on the same grids cost less
    from gpu_kernels.features import pdl_supported

    if pdl_supported(dev):  # the same graph with plain launches, timed in the same run
        assert got["layers_ms_no_pdl"] > 0
        assert got["layers_TBps_no_pdl"] == pytest.approx(1e6 / got["layers_ms_no_pdl"] / 1e9)
    if pdl_supported(dev):  # and by each count of pages asked for, every output checked the same way
        assert got["layers_TBps_no_prefetch"] == pytest.approx(1e6 / got["layers_ms_no_prefetch"] / 1e9)
        assert sorted(got["layers_ms_by_prefetch_pages"]) == ["0", "1000", "2"]
        assert all(ms > 0 for ms in got["layers_ms_by_prefetch_pages"].values())
    else:
        assert "layers_ms_no_prefetch" not in got and "layers_ms_by_prefetch_pages" not in got


def test_layer_attainable_is_the_layer_floor_plus_the_bytes():
    from benchmarks.kernels import layer_attainable_fields

    rec = dict(kv_bytes=40_000_000, read_bytes=50_000_000, layers_ms=0.02, layers_floor_ms=0.003)
    got = layer_attainable_fields(rec, dict(LIMITS, hbm_read_GBps=5000.0))
    assert got["layers_attainable_ms"] == pytest.approx(0.003 + 0.01)
    assert got["layers_attainable_TBps"] == pytest.approx(40e6 / 0.013 / 1e9)
    assert got["layers_frac_of_attainable"] == pytest.approx(0.013 / 0.02)
    assert layer_attainable_fields(dict(kv_bytes=1, layers_ms=0.1), LIMITS) == {}  # no layer run, no bound


def test_call_grids_follow_the_launch_plan():
    """The floor's empty kernels take the grids the call launches: programs per split times the
    splits, the warps of the config (the warp-specialised kernel's producer and consumers rounded down
    to a power of two), and one merge program per row at N=1 (none for one split)."""
    import torch

    from benchmarks.kernels import Shape, call_grids

    cpu = torch.device("cpu")
    sh = Shape(32, 2048, 16, torch.Generator().manual_seed(0), cpu)
    # last: whether the attention is a programmatic dependent of the kernel before it (never without PDL)
    assert call_grids(sh, dict(block_m=64, block_n=64, num_warps=4, num_splits=16), 128) == (
        8 * 2 * 16, 4, 32 * 32, False)
    assert call_grids(sh, dict(block_m=128, num_warps=8, num_splits=1), 128) == (8, 8, 0, False)
    assert call_grids(sh, dict(warp_specialized=True, num_splits=2), 128) == (8 * 2, 8, 32 * 32, False)
