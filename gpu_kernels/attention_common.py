"""Scalar `@triton.jit` helpers that both split-KV attention kernels call: the Triton kernel
(`attention_kernels.paged_attention_kernel`) and the warp-specialised Gluon kernel
(`paged_attention_ws.ws_paged_attention_kernel`). They hold no tensor layouts, so Gluon code can
call them too; keeping them here lets each kernel module import them without importing the other.

A grid of either kernel is (N * HKV * ROW_BLOCKS, num_splits): program (row block, KV head,
sequence) along axis 0, split along axis 1, each split a run of split_tokens context tokens that
starts at a page.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def launch_dependents():
    """Let the kernel launched after this one as a programmatic dependent (the split merge) launch,
    once every program has called this or exited; a no-op outside such a launch."""
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_prior():
    """Wait until the kernel before this one in the stream has ended and its writes are visible; a
    no-op unless this kernel was launched as its programmatic dependent."""
    tl.extra.cuda.gdc_wait()


@triton.jit
def program_place(max_pages, split_tokens, HKV: tl.constexpr, ROW_BLOCKS: tl.constexpr, PAGE: tl.constexpr):
    """This program's place in the grid (N * HKV * ROW_BLOCKS, num_splits), from its ids alone (no
    memory read, so it may run before the wait for the kernel before): (row block, KV head,
    sequence n as int64, split, lo, split_end), [lo, split_end) the split's share of the table's
    max_pages * PAGE tokens."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rb = pid % ROW_BLOCKS
    nh = pid // ROW_BLOCKS
    kvh = nh % HKV
    n = (nh // HKV).to(tl.int64)
    lo = split * split_tokens
    split_end = tl.minimum(lo + split_tokens, max_pages * PAGE)
    return rb, kvh, n, split, lo, split_end


@triton.jit
def valid_end(kvlen_ptr, stride_ln, stride_lh, n, kvh, max_pages, split_end, PAGE: tl.constexpr):
    """hi = min(split_end, kv_len of list (n, kvh)): where the split's valid tokens end."""
    kvl = tl.load(kvlen_ptr + n * stride_ln + kvh * stride_lh)
    kvl = tl.minimum(tl.maximum(kvl, 0), max_pages * PAGE)
    return tl.minimum(split_end, kvl)


@triton.jit
def program_split(kvlen_ptr, stride_ln, stride_lh, max_pages, split_tokens,
                  HKV: tl.constexpr, ROW_BLOCKS: tl.constexpr, PAGE: tl.constexpr):
    """`program_place` plus hi (`valid_end`): (row block, KV head, n, split, lo, split_end, hi)."""
    rb, kvh, n, split, lo, split_end = program_place(max_pages, split_tokens, HKV, ROW_BLOCKS, PAGE)
    return rb, kvh, n, split, lo, split_end, valid_end(kvlen_ptr, stride_ln, stride_lh, n, kvh, max_pages,
                                                       split_end, PAGE)
