"""CompactKeyIndex: writes through the host store's page tables, page scores equal to scanning the
dequantized keys, size accounting, the memory refusal, and lifecycle.

Tolerance: page/token scores vs an fp32 scan of the dequantized keys (read back from the host
store and quantized by the reference): relative error 1e-5 on finite entries, identical -inf entries.
Both paths (Triton kernel under the interpreter on CPU, and plain torch) are checked.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpu_kernels.compact_keys import dequantize_keys, kernel_interpreted, quantize_keys_reference  # noqa: E402
from offload.compact_keys import CompactKeyIndex  # noqa: E402
from offload.host_store import HostKVStore  # noqa: E402

TOL = 1e-5
L, HKV, D, P, PAGES = 2, 2, 64, 16, 24


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def expected_scores(store, seq_ids, layer, q, kv_len, bits, group, scale, max_pages):
    """Page and token scores of the first kv_len[i] tokens of each sequence, from the store's keys:
    quantize (reference), dequantize, fp32 dot products, page max; -inf elsewhere."""
    n = len(seq_ids)
    tok = torch.full((n, HKV, max_pages * P), float("-inf"))
    for i, sid in enumerate(seq_ids):
        ntok = int(kv_len[i])
        if ntok == 0:
            continue
        k, _ = store.read(sid, layer, 0, store.num_tokens(sid))  # [Hkv, T, D]
        deq = dequantize_keys(*quantize_keys_reference(k, bits, group), bits, group)[:, :ntok]
        tok[i, :, :ntok] = torch.einsum("hd,htd->ht", q[i].float(), deq) * scale
    return tok.reshape(n, HKV, max_pages, P).amax(dim=-1), tok


def fill(store, index, gen, seq_lens, device):
    """Allocate sequences, write each one's prefill, then one 8-token block for all rows at once
    (crossing page boundaries), to the store and the index through the same page tables."""
    def write(ids, starts, t):
        kv = torch.randn(2, L, len(ids), HKV, t, D, generator=gen)
        table = store.page_tables(ids)
        st = torch.tensor(starts, dtype=torch.int32)
        for layer in range(L):
            store.write(layer, table, st, kv[0, layer], kv[1, layer])
            index.write(layer, table.to(device), st.to(device), kv[0, layer].to(device))

    seq_ids = list(seq_lens)
    for sid, ntok in seq_lens.items():
        store.allocate(sid, ntok)
        if ntok:
            write([sid], [0], ntok)
    for sid in seq_ids:
        store.extend(sid, seq_lens[sid] + 8)
    write(seq_ids, [seq_lens[s] for s in seq_ids], 8)
    return seq_ids


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_scores_equal_scan_of_dequantized_keys(bits, use_kernel):
    if use_kernel and not (torch.cuda.is_available() or kernel_interpreted()):
        pytest.skip("kernel path needs CUDA or the Triton interpreter")
    gen = torch.Generator().manual_seed(bits)
    store = HostKVStore(L, HKV, D, P, PAGES, dtype=torch.float32, pin_memory=False)
    index = CompactKeyIndex(L, HKV, D, P, PAGES, bits=bits, group_size=32, device="cpu", use_kernel=use_kernel)
    assert index.use_kernel == use_kernel
    # lengths: partial pages, an exact page, an empty sequence (only the block lands in it)
    seq_ids = fill(store, index, gen, {"a": 50, "b": 16, "c": 7, "d": 0}, "cpu")
    table = store.page_tables(seq_ids)
    max_pages = table.shape[1] + 1  # one trailing -1 entry beyond every row
    table = torch.cat([table, torch.full((len(seq_ids), 1), -1, dtype=torch.int32)], dim=1)
    kv_len = torch.tensor([store.num_tokens(s) for s in seq_ids], dtype=torch.int32)
    kv_len[2] = 3  # a row scored over a prefix of its tokens
    kv_len[3] = 0  # and a row with no context
    q = torch.randn(len(seq_ids), HKV, D, generator=gen)
    scale = D ** -0.5
    for layer in range(L):
        ps, ts = index.scores(layer, q, table, kv_len, scale, return_token_scores=True)
        pr, tr = expected_scores(store, seq_ids, layer, q, kv_len, bits, 32, scale, max_pages)
        for got, ref in ((ps, pr), (ts, tr)):
            fin = torch.isfinite(ref)
            assert torch.equal(fin, torch.isfinite(got))
            assert bool((got[~fin] == float("-inf")).all())
            assert rel_err(got[fin], ref[fin]) < TOL
        assert torch.equal(index.page_scores(layer, q, table, kv_len, scale), ps)
    # pages no sequence owns were never written
    owned = set(table[table >= 0].tolist())
    free = [p for p in range(PAGES) if p not in owned]
    assert bool((index.scales(0)[free] == 0).all())
    store.close()
    index.close()


def test_kernel_and_torch_paths_agree():
    if not (torch.cuda.is_available() or kernel_interpreted()):
        pytest.skip("kernel path needs CUDA or the Triton interpreter")
    gen = torch.Generator().manual_seed(7)
    idx = {k: CompactKeyIndex(1, HKV, D, P, 8, bits=4, device="cpu", use_kernel=k) for k in (True, False)}
    table = torch.tensor([[5, 2, 7], [0, 3, -1]], dtype=torch.int32)
    k_new = torch.randn(2, HKV, 20, D, generator=gen)
    for k in idx.values():
        k.write(0, table, torch.tensor([3, 1], dtype=torch.int32), k_new)
        k.write(0, table, 12, k_new[:, :, 10:])  # int start for every row, overwriting part of the first write
    assert torch.equal(idx[True].codes(0), idx[False].codes(0))
    assert torch.equal(idx[True].scales(0), idx[False].scales(0))


def test_sizes():
    idx = CompactKeyIndex(L, HKV, D, P, PAGES, bits=4, group_size=32, device="cpu")
    assert idx.nbytes == idx.codes(0).nbytes * L + idx.scales(0).nbytes * L
    assert idx.bytes_per_page * PAGES == idx.nbytes
    # Qwen3-8B KV geometry at int4 / group 32 / fp16 scales: 20.25 KiB per token (bf16 KV: 144 KiB)
    per_token = CompactKeyIndex.nbytes_for(36, 8, 128, 16, 1, bits=4, group_size=32) / 16
    assert per_token == 20.25 * 1024
    assert CompactKeyIndex.nbytes_for(36, 8, 128, 16, 1, bits=8, group_size=32) / 16 == 38.25 * 1024


def test_memory_refusal_says_what_fits():
    with pytest.raises(MemoryError, match=r"at most \d+ pages \(\d+ tokens\) fit at int8, \d+ pages .* at int4"):
        CompactKeyIndex(36, 8, 128, 16, 10**12, bits=8, device="cpu")
    with pytest.raises(MemoryError, match="must stay free"):
        CompactKeyIndex(1, 1, 64, 16, 4, device="cpu", reserve_bytes=10**18)


def test_argument_and_lifecycle_errors():
    with pytest.raises(ValueError, match="group_size"):
        CompactKeyIndex(1, 1, 64, 16, 4, group_size=48, device="cpu")
    with pytest.raises(ValueError, match="num_pages"):
        CompactKeyIndex(1, 1, 64, 16, 0, device="cpu")
    idx = CompactKeyIndex(1, HKV, D, P, 4, device="cpu", use_kernel=False)
    table = torch.tensor([[1, -1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="page ids"):
        idx.write(0, table, 10, torch.randn(1, HKV, 8, D))  # positions 16.. have no page
    with pytest.raises(ValueError, match="layer 3 out of range"):
        idx.write(3, table, 0, torch.randn(1, HKV, 8, D))
    with pytest.raises(ValueError, match="only taken by the kernel path"):
        idx.scores(0, torch.randn(1, HKV, D), table, torch.tensor([4], dtype=torch.int32), 1.0,
                   out=torch.empty(1, HKV, 2))
    idx.close()
    with pytest.raises(RuntimeError, match="closed"):
        idx.page_scores(0, torch.randn(1, HKV, D), table, torch.tensor([4], dtype=torch.int32), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_index_bf16(bits):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(bits)
    idx = CompactKeyIndex(2, 8, 128, 16, 600, bits=bits, device=dev)
    ref = CompactKeyIndex(2, 8, 128, 16, 600, bits=bits, device=dev, use_kernel=False)
    assert idx.use_kernel and not ref.use_kernel
    table = torch.randperm(600, generator=gen)[:2 * 300].reshape(2, 300).int().to(dev)
    k = torch.randn(2, 8, 4000, 128, generator=gen).to(torch.bfloat16).to(dev)
    for i in (idx, ref):
        for layer in range(2):
            i.write(layer, table, 0, k[:, :, :3968])
            i.write(layer, table, torch.tensor([3968, 3968], dtype=torch.int32, device=dev), k[:, :, 3968:])
    assert torch.equal(idx.codes(1), ref.codes(1)) and torch.equal(idx.scales(1), ref.scales(1))
    q = torch.randn(2, 8, 128, generator=gen).to(torch.bfloat16).to(dev)
    kv_len = torch.tensor([4000, 1234], dtype=torch.int32, device=dev)
    ps = idx.page_scores(1, q, table, kv_len, 128 ** -0.5)
    pr = ref.page_scores(1, q, table, kv_len, 128 ** -0.5)
    fin = torch.isfinite(pr)
    assert torch.equal(fin, torch.isfinite(ps))
    assert rel_err(ps[fin], pr[fin]) < TOL


@pytest.mark.gpu
def test_gpu_memory_refusal():
    free, _ = torch.cuda.mem_get_info()
    pages = free // CompactKeyIndex.nbytes_for(36, 8, 128, 16, 1, bits=4) + 1
    with pytest.raises(MemoryError, match="fit at int4"):
        CompactKeyIndex(36, 8, 128, 16, pages, bits=4, device="cuda")
