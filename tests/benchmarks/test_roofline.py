"""The roofline's byte model against numbers worked by hand for a small geometry, and its floor."""
import pytest
import torch

from benchmarks.roofline import BlockBytes, block_bytes, floor_ms, selected_pages, weight_bytes
from runtime.config import ModelConfig, SparseConfig

# 4 layers, hidden 64, MLP 128, 4 query heads and 2 KV heads of 16, vocabulary 100, Qwen3 (q/k norms)
MODEL = ModelConfig(architecture="qwen3", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048, qk_norm=True)
SPARSE = SparseConfig(budget_fraction=0.05, page_size=16, dense_layers=1, compact_bits=4, compact_group=32)
BF16 = torch.bfloat16
N, C, S, B = 2, 1024, 3, 8  # batch, context, steps, block size

# Parameters of one layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12288, q/k norms 16 + 16, input and
# post-attention norms 64 + 64, MLP 3 x 64x128 = 24576: 37024. With logits: 4 layers + final norm 64 +
# LM head 100x64 = 154560 parameters = 309120 bytes; without: the last layer's MLP (24576) and
# post-attention norm (64) unread, no final norm, no LM head: 123456 parameters = 246912 bytes.
W_LOGITS, W_NO_LOGITS = 309120, 246912
KV = 2 * 2 * 16 * 2  # K and V of one token in one layer: 128 bytes
# 5% of 1024 = 51 tokens -> 4 budget pages; forced: sink page 0, window pages 60-63 (the last among them): 9
K = 9
# one sparse pass: per row the exact layer's whole context + 3 sparse layers x 9 pages x 16 tokens
SEL = N * (1 * C + 3 * K * 16) * KV  # 372736
WEIGHTS = S * W_LOGITS + W_NO_LOGITS  # 1174272: S steps with logits + a commit without


def test_weights_and_selection_worked_by_hand():
    assert weight_bytes(MODEL, BF16, logits=True) == W_LOGITS
    assert weight_bytes(MODEL, BF16, logits=False) == W_NO_LOGITS
    assert selected_pages(SPARSE, C) == K
    assert selected_pages(SPARSE, 40) == 3  # a short context: its 3 pages are all forced


def test_dense_reads_the_whole_context_every_pass():
    block = block_bytes(MODEL, "dense", SPARSE, N, C, S, B, BF16)
    assert block.hbm == dict(weights=WEIGHTS, kv=(S + 1) * N * C * 4 * KV) == dict(weights=1174272, kv=4194304)
    assert block.pcie_bytes == 0 and not block.overlapped


def test_mage_is_exact_at_step_0_then_sparse():
    block = block_bytes(MODEL, "mage", SPARSE, N, C, S, B, BF16)
    assert block.hbm == dict(weights=WEIGHTS, kv=N * C * 4 * KV + S * SEL)  # 1048576 + 3 x 372736
    assert block.hbm_bytes == 3341056


def test_quest_selects_every_pass_from_page_summaries():
    block = block_bytes(MODEL, "quest", SPARSE, N, C, S, B, BF16)
    # fp32 min and max per (page, KV head, dim) of the 3 sparse layers' 64 pages, every pass
    summaries = (S + 1) * N * 3 * 64 * 2 * 16 * 8
    assert block.hbm == dict(weights=WEIGHTS, kv=(S + 1) * SEL, summaries=summaries)
    assert block.hbm_bytes == 1174272 + 1490944 + 393216


def test_herald_without_and_with_the_lookahead():
    # compact int4 keys, group min(32, 16) = 16: 8 bytes of codes + 1 fp16 scale = 10 bytes per key
    scan = N * 3 * C * 2 * 10  # 122880, once per block
    fetch = N * 3 * 2 * K * (2 * 16 * 16 * 2)  # every selected (page, KV head) unit of 1024 bytes: 110592
    write = N * B * 3 * KV  # the commit's K/V of the sparse layers to the host: 6144
    sync = block_bytes(MODEL, "herald", SPARSE, N, C, S, B, BF16)
    assert sync == BlockBytes(dict(weights=WEIGHTS, kv=(S + 1) * SEL, scan=scan), pcie_read=fetch, pcie_write=write)
    assert sync.hbm_bytes == 2788096
    ahead = block_bytes(MODEL, "herald", SPARSE, N, C, S, B, BF16, lookahead=True, fetch_fraction=0.25)
    # one more pass without logits reading the selection; still one scan (the lookahead's)
    assert ahead == BlockBytes(dict(weights=WEIGHTS + W_NO_LOGITS, kv=(S + 2) * SEL, scan=scan),
                               pcie_read=fetch // 4, pcie_write=write, overlapped=True)
    assert ahead.hbm_bytes == 3407744
    # a host scan reads no GPU memory; split scans the newer half on the GPU
    cpu = block_bytes(MODEL, "herald", SparseConfig(dense_layers=1, source="cpu"), N, C, S, B, BF16)
    split = block_bytes(MODEL, "herald", SparseConfig(dense_layers=1, source="split"), N, C, S, B, BF16)
    assert cpu.hbm["scan"] == 0 and split.hbm["scan"] == scan // 2
    # 8-bit keys: 16 bytes of codes + 2 of scale
    int8 = block_bytes(MODEL, "herald", SparseConfig(dense_layers=1, compact_bits=8), N, C, S, B, BF16)
    assert int8.hbm["scan"] == N * 3 * C * 2 * 18


def test_a_token_shift_commit_reads_the_lm_head():
    block = block_bytes(MODEL, "dense", SPARSE, N, C, S, B, BF16, commit_logits=True)
    assert block.hbm["weights"] == (S + 1) * W_LOGITS


def test_floor_adds_serial_transfers_and_overlaps_the_lookahead():
    block = BlockBytes(dict(weights=3_000_000, kv=1_000_000), pcie_read=900_000, pcie_write=100_000)
    # 4 MB at 2 GB/s = 2 ms; 1 MB at 0.5 GB/s = 2 ms
    assert floor_ms(block, 2.0, 0.5) == dict(hbm_ms=2.0, pcie_ms=2.0, floor_ms=4.0)
    overlapped = BlockBytes(block.hbm, pcie_read=900_000, pcie_write=100_000, overlapped=True)
    assert floor_ms(overlapped, 2.0, 0.25) == dict(hbm_ms=2.0, pcie_ms=4.0, floor_ms=4.0)
    assert floor_ms(BlockBytes(dict(weights=2_000_000)), 1.0, 0.5)["floor_ms"] == 2.0


def test_refusals():
    with pytest.raises(ValueError, match="mode"):
        block_bytes(MODEL, "sparse", SPARSE, N, C, S, B, BF16)
    with pytest.raises(ValueError, match="lookahead"):
        block_bytes(MODEL, "dense", SPARSE, N, C, S, B, BF16, lookahead=True)
    with pytest.raises(ValueError, match="fetch_fraction"):
        block_bytes(MODEL, "herald", SPARSE, N, C, S, B, BF16, fetch_fraction=1.5)


@pytest.mark.gpu
def test_measured_rates_on_the_gpu():
    """The run's rates: the HBM read rate well above the pinned copy's (an H100 reads ~3 TB/s, copies ~55 GB/s)."""
    from benchmarks.roofline import hbm_read_GBps, pinned_copy_GBps

    device = torch.device("cuda")
    hbm, copy = hbm_read_GBps(device, nbytes=256 * 2**20), pinned_copy_GBps(device)
    assert 5 < copy < 200 and 10 * copy < hbm < 20_000, (hbm, copy)
    assert hbm_read_GBps(torch.device("cpu")) is None and pinned_copy_GBps(torch.device("cpu")) is None
