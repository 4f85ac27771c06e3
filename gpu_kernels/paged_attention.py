"""Split-KV paged attention of a block of queries over a paged KV context: the entry points, and
their plain-torch references.

    plan = plan_attention(q, k_pages, v_pages, page_table, kv_len, options=AttentionOptions(...))
    out, lse, page_scores, token_scores = run_attention(plan, q, k_pages, v_pages, page_table, kv_len,
                                                        scale=scale, out=..., workspace=...)

`paged_attention` and `block_attention` do both in one call (the plan is cached per shape).

Where each piece lives:
- `attention_inputs`: what a call passes (the store and pool layouts of K/V and their page
  tables), checked, and the description of it a plan is keyed by;
- `attention_plan`: what is decided once per shape (tiles, split count, workspace, which kernel,
  PDL chaining, the L2 prefetch, the merge's shape), from measurements cited there;
- `attention_kernels`: the Triton attention kernel and the merge of its splits;
- `paged_attention_ws`: the warp-specialised Gluon kernel for sm_90, which the plan picks for
  long splits of >= 128 query rows per KV head;
- `attention_common`: the scalar jit helpers both kernels call.

One program handles the G*T queries of one KV head, so each K/V tile is read once per KV head; the
token range is cut into splits (flash-decoding) whose partial (out, lse) a second kernel merges
(with one split, no merge: the attention kernel writes the final output). Given the block's own
K/V as well (`block_attention`), split 0 attends to them after its context tiles, so attention
over [context, block] is one kernel (and the merge). The same pass can score every context token
with the block-mean query (page and token scores, which selection reads), from the K tiles it
already holds.

Launched as a programmatic dependent of the kernel before it (PDL), each program first asks L2 for
a page or two of its split and only then waits for that kernel, so its first tiles are on their way
while that kernel ends: 0.85-0.95 us of an 18.5 us call at N=1 T=32 over 5% of 128K on an H100, in
a graph of 8 calls. A prefetch changes no value, so this holds whatever the kernel before writes.

Per call the host checks the tensors, finds the plan (a cache lookup, or the plan it is given)
and launches; nothing syncs with the device. A `run_attention` given `out`, `lse`, the score
buffers and `workspace` (`plan.config.workspace_numel` says how large) allocates nothing, so it can
be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton

from ._uva import host_tensor
from .attention_inputs import KVTensor, Operands, describe_inputs, describe_layout
from .attention_kernels import merge_splits_kernel, paged_attention_kernel
from .attention_plan import AttentionOptions, AttentionPlan, plan_attention, plan_for
from .kv_fp8 import dequantize_units

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def paged_attention(
    q: torch.Tensor,
    k_pages: KVTensor,
    v_pages: KVTensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    scale: float,
    return_page_scores: bool = False,
    return_token_scores: bool = False,
    k_block: torch.Tensor | None = None,
    v_block: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    options: AttentionOptions = AttentionOptions(),
) -> Outputs:
    """Attention of a block of queries over a paged context (no causal mask inside the context),
    and optionally over the block's own keys too, in one call: `plan_attention` (cached per shape)
    and `run_attention` into new output tensors.

    q [N, Hq, T, D] (bf16/fp16/fp32; Hq = G * Hkv, query head h uses KV head h // G).
    k_pages, v_pages: store layout [num_pages, Hkv, page_size, D] or pool layout
      [num_slots, page_size, D]; GPU tensors, or pinned host tensors (bare or in `HostPointer`),
      read zero-copy over PCIe. Same dtype as q, or float8_e4m3fn codes (`gpu_kernels.kv_fp8`);
      same strides as each other, last dim contiguous.
    page_table int32: [N, max_pages] (store, shared by heads) or [N, Hkv, max_pages] (per head;
      required for the pool). Entries at and beyond cdiv(kv_len, page_size) may be loaded, but no
      K/V is read through them.
    kv_len int32 [N, Hkv] (or [N]): valid tokens per list; clamped to [0, max_pages * page_size]
      inside the kernel (not checked on the host, which would need a device sync).
    scale: softmax scale, > 0 (usually D ** -0.5).
    return_page_scores / return_token_scores: also compute, per KV head, the block-mean query's
      scores: token_scores [N, Hkv, max_pages * page_size] fp32 = scale * q_mean . k, page_scores
      [N, Hkv, max_pages] fp32 = max over each page's valid tokens; -inf beyond kv_len.
    k_block, v_block: [N, Hkv, T, D] on q's device, q's dtype: the block's own K/V, T more keys
      every query sees (bidirectional), attended in the same launch; out and lse then cover
      [context, block]. The scores stay context-only.
    k_scale, v_scale: fp8 K/V's fp32 scales per (page, KV head): store [num_pages, Hkv], pool
      [num_slots], on q's device, sharing strides; each K/V tile is dequantized as it is loaded.
      None for K/V in q's dtype.
    options: tuning overrides (`AttentionOptions`: split count, tiles, partial dtype, PDL, which
      kernel, L2 prefetch); by default the plan decides each.

    Returns (out [N, Hq, T, D] in q's dtype, lse [N, Hq, T] fp32 natural log (-inf for an empty
    context, where out is 0), page_scores or None, token_scores or None). A caller that gives the
    outputs and workspace (to capture the call in a CUDA graph) plans once and uses `run_attention`.
    """
    inputs, operands = describe_inputs(q, k_pages, v_pages, page_table, kv_len, k_block, v_block,
                                       return_page_scores, return_token_scores, k_scale, v_scale)
    return _launch(plan_for(inputs, options), operands, scale)


def run_attention(
    plan: AttentionPlan,
    q: torch.Tensor,
    k_pages: KVTensor,
    v_pages: KVTensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    scale: float,
    k_block: torch.Tensor | None = None,
    v_block: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    page_scores: torch.Tensor | None = None,
    token_scores: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> Outputs:
    """Run `plan` (from `plan_attention`) over tensors of the shapes, layout and device it was made
    for, as `paged_attention` takes them; it computes the scores it was planned with.

    out [N, Hq, T, D] (q's dtype), lse [N, Hq, T] fp32, page_scores [N, Hkv, max_pages] fp32,
    token_scores [N, Hkv, max_pages * page_size] fp32: optional contiguous output buffers (new
    tensors where not given). workspace: optional fp32 buffer of at least
    `plan.config.workspace_numel` elements for the split partials. With every buffer given, a run
    allocates nothing, so it can be captured in a CUDA graph and replayed. Host work per run: the
    tensors' checks and one (or, with splits, two) kernel launches; no device sync. Returns what
    `paged_attention` returns.
    """
    planned = plan.inputs
    inputs, operands = describe_inputs(q, k_pages, v_pages, page_table, kv_len, k_block, v_block,
                                       planned.page_scores, planned.token_scores, k_scale, v_scale)
    if inputs != planned:
        diff = ", ".join(f"{name} {got} (planned: {want})"
                         for name, got, want in zip(inputs._fields, inputs, planned) if got != want)
        raise ValueError(f"the tensors do not match the plan: {diff}; make a plan for them with plan_attention")
    for name, buf, planned_scores in (("page_scores", page_scores, planned.page_scores),
                                      ("token_scores", token_scores, planned.token_scores)):
        if buf is not None and not planned_scores:
            raise ValueError(f"a {name} buffer was given to a plan without them; plan with {name}=True")
    return _launch(plan, operands, scale, out, lse, page_scores, token_scores, workspace)


def block_attention(
    q: torch.Tensor,
    k_block: torch.Tensor,
    v_block: torch.Tensor,
    k_pages: KVTensor,
    v_pages: KVTensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    scale: float,
    return_page_scores: bool = False,
    return_token_scores: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    options: AttentionOptions = AttentionOptions(),
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention of a block's queries over [paged context, the block's own K/V] (bidirectional),
    in one kernel launch (plus the split merge): the block's keys are the last tile of split 0.

    q [N, Hq, T, D]; k_block, v_block [N, Hkv, T, D] in q's dtype (never fp8); the paged arguments
    (fp8 pages with their scales too) and options as in `paged_attention`. Returns (out [N, Hq, T, D] in q's dtype, page_scores or None, token_scores
    or None); the scores cover the context only.
    """
    if k_block.stride(-1) != 1 or k_block.stride() != v_block.stride():
        k_block, v_block = k_block.contiguous(), v_block.contiguous()
    out, _, pscores, tscores = paged_attention(
        q, k_pages, v_pages, page_table, kv_len, scale=scale,
        return_page_scores=return_page_scores, return_token_scores=return_token_scores,
        k_block=k_block, v_block=v_block, k_scale=k_scale, v_scale=v_scale, options=options)
    return out, pscores, tscores


def _launch(plan: AttentionPlan, operands: Operands, scale: float, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, page_scores: torch.Tensor | None = None,
            token_scores: torch.Tensor | None = None, workspace: torch.Tensor | None = None) -> Outputs:
    """Check what only a run has (scale, buffers) and launch the plan's kernels over operands."""
    if not scale > 0:
        raise ValueError(f"scale must be positive (usually head_dim ** -0.5), got {scale}")
    inputs, cfg = plan.inputs, plan.config
    n, hq, t, d, hkv, max_pages = inputs.n, inputs.hq, inputs.t, inputs.head_dim, inputs.hkv, inputs.max_pages
    dev = inputs.device
    q, k, v, page_table, kv_len, k_block, v_block, k_scale, v_scale = operands
    out = _buffer(out, (n, hq, t, d), inputs.dtype, dev, "out")
    lse = _buffer(lse, (n, hq, t), torch.float32, dev, "lse")
    pscores = _buffer(page_scores, (n, hkv, max_pages), torch.float32, dev, "page_scores") \
        if inputs.page_scores else None
    tscores = _buffer(token_scores, (n, hkv, max_pages * inputs.page_size), torch.float32, dev,
                      "token_scores") if inputs.token_scores else None
    if n == 0 or t == 0:
        return out, lse, pscores, tscores
    if max_pages == 0 and not inputs.has_block:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse, pscores, tscores

    splits = cfg.num_splits
    if splits > 1:
        need = cfg.workspace_numel
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.float32, device=dev)
        elif (workspace.dtype != torch.float32 or workspace.device != dev or not workspace.is_contiguous()
              or workspace.numel() < need):
            raise ValueError(f"workspace must be a contiguous fp32 tensor on {dev} with >= {need} elements "
                             f"({splits} splits); got {workspace.numel()} {workspace.dtype} on {workspace.device}")
        partials, partial_lse = _split_workspace(workspace, n * hq * t, splits, d, plan.partial_dtype)
    else:
        partials = partial_lse = lse  # never dereferenced: the kernel writes the final output itself
    k_strides = k.stride()
    k_strides = (k_strides[0], 0, k_strides[1]) if inputs.pool else k_strides[:3]
    pt_strides = page_table.stride()
    if not inputs.per_head_table:
        pt_strides = (pt_strides[0], 0, pt_strides[1])
    if not inputs.has_block:  # unread: any pointer of q's dtype will do
        k_block = v_block = q
    if inputs.kv_fp8:  # a pool's scales are [num_slots]: the head stride is 0, as K's is
        scale_strides = (k_scale.stride(0), 0) if inputs.pool else k_scale.stride()
    else:  # unread
        k_scale = v_scale = lse
        scale_strides = (0, 0)
    # Both attention kernels take these arguments; the Triton kernel also takes its score outputs
    # and fp8 scales (after the partials), the prefetch's arguments and the scales' strides (at the end).
    pointers = (q, k, v, page_table, kv_len, k_block, v_block, out, lse, partials, partial_lse)
    scalars = (float(scale), *q.stride()[:3], *k_strides, *pt_strides, *kv_len.stride(),
             *(k_block.stride()[:3] if inputs.has_block else (0, 0, 0)), max_pages, cfg.split_tokens, splits)
    grid = (n * hkv * cfg.row_blocks, splits)
    if plan.warp_specialized:
        from .paged_attention_ws import ws_paged_attention_kernel

        ws_paged_attention_kernel[grid](*pointers, *scalars, **plan.attention_kwargs)
    else:
        paged_attention_kernel[grid](
            *pointers, lse if pscores is None else pscores, lse if tscores is None else tscores,  # unread if off
            k_scale, v_scale, *scalars, host_tensor(k).shape[0], plan.prefetch_pages, *scale_strides,
            **plan.attention_kwargs)
    if splits > 1:
        rows = n * hq * t
        merge_splits_kernel[(triton.cdiv(rows, plan.merge_rows),)](
            partials, partial_lse, out, lse, rows, splits, **plan.merge_kwargs)
    return out, lse, pscores, tscores


def _split_workspace(workspace: torch.Tensor, rows: int, splits: int, head_dim: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials [rows * splits * head_dim] in dtype, lse [rows * splits] fp32) inside the fp32
    workspace: the partials at its start (16-bit ones fill half their fp32 region), the lse after
    that region, so one workspace size (`workspace_numel`) serves every partial dtype."""
    region = rows * splits * head_dim
    partials = workspace[:region]
    if dtype != torch.float32:
        partials = partials.view(dtype)[:region]
    return partials, workspace[region:region + rows * splits]


def _buffer(buf: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, dev: torch.device,
            name: str) -> torch.Tensor:
    """buf checked against (shape, dtype, device, contiguous), or a new empty tensor."""
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=dev)
    if buf.shape != shape or buf.dtype != dtype or buf.device != dev or not buf.is_contiguous():
        raise ValueError(f"{name} buffer must be contiguous {tuple(shape)} {dtype} on {dev}; got "
                         f"{tuple(buf.shape)} {buf.dtype} on {buf.device}")
    return buf


# ---------------------------------------------------------------------------------- references


def _gather_context(k_pages, v_pages, page_table, kv_len, n, h, page_size, pool, per_head, device,
                    k_scale=None, v_scale=None):
    """K, V [L, D] of list (n, h) in context order (reference helper); fp8 pages come back
    dequantized to fp32 with their scales."""
    k, v = host_tensor(k_pages), host_tensor(v_pages)
    length = int(kv_len[n, h])
    n_pages = -(-length // page_size)
    entries = (page_table[n, h] if per_head else page_table[n])[:n_pages].long().to(k.device)
    index = (entries,) if pool else (entries, h)
    kc, vc = k[index], v[index]
    if k_scale is not None:
        scale_index = tuple(i.to(k_scale.device) if torch.is_tensor(i) else i for i in index)
        kc, vc = dequantize_units(kc, k_scale[scale_index]), dequantize_units(vc, v_scale[scale_index])
    d = kc.shape[-1]
    return kc.reshape(-1, d)[:length].to(device), vc.reshape(-1, d)[:length].to(device)


def paged_attention_reference(
    q: torch.Tensor,
    k_pages: KVTensor,
    v_pages: KVTensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    scale: float,
    return_page_scores: bool = False,
    return_token_scores: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> Outputs:
    """Plain-torch `paged_attention`: gather each list's pages (fp8 ones dequantized with their
    scales, `kv_fp8.dequantize_units`), softmax in fp32."""
    hkv, page_size, per_head, pool, kv_len = describe_layout(q, k_pages, v_pages, page_table, kv_len, k_scale,
                                                             v_scale)
    n, hq, t, d = q.shape
    g = hq // hkv
    max_pages = page_table.shape[-1]
    max_tokens = max_pages * page_size
    lengths = kv_len.cpu()
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > max_tokens):
        raise ValueError(f"kv_len must lie in [0, max_pages * page_size = {max_tokens}]; got "
                         f"[{int(lengths.min())}, {int(lengths.max())}]")
    table = page_table.cpu()
    out = torch.zeros(n, hq, t, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n, hq, t), float("-inf"), dtype=torch.float32, device=q.device)
    tscores = torch.full((n, hkv, max_tokens), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(n):
        for h in range(hkv):
            length = int(lengths[b, h])
            if length == 0:
                continue
            kc, vc = _gather_context(k_pages, v_pages, table, lengths, b, h, page_size, pool, per_head,
                                     q.device, k_scale, v_scale)
            qg = q[b, h * g:(h + 1) * g].float()  # [G, T, D]
            s = torch.matmul(qg, kc.float().T) * scale  # [G, T, L]
            lse[b, h * g:(h + 1) * g] = torch.logsumexp(s, dim=-1)
            out[b, h * g:(h + 1) * g] = torch.matmul(torch.softmax(s, dim=-1), vc.float())
            q_mean = qg.reshape(-1, d).mean(dim=0)
            tscores[b, h, :length] = (kc.float() @ q_mean) * scale
    pscores = tscores.reshape(n, hkv, max_pages, page_size).amax(dim=-1) if max_pages else \
        torch.empty(n, hkv, 0, device=q.device)
    return (out.to(q.dtype), lse, pscores if return_page_scores else None,
            tscores if return_token_scores else None)


def block_attention_reference(
    q: torch.Tensor,
    k_block: torch.Tensor,
    v_block: torch.Tensor,
    k_pages: KVTensor,
    v_pages: KVTensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    scale: float,
    return_page_scores: bool = False,
    return_token_scores: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Plain torch `block_attention`: one softmax over [gathered context keys, block keys]."""
    hkv, page_size, per_head, pool, kv_len = describe_layout(q, k_pages, v_pages, page_table, kv_len, k_scale,
                                                             v_scale)
    n, hq, t, d = q.shape
    g = hq // hkv
    lengths, table = kv_len.cpu(), page_table.cpu()
    out = torch.empty(n, hq, t, d, dtype=torch.float32, device=q.device)
    for b in range(n):
        for h in range(hkv):
            kc, vc = _gather_context(k_pages, v_pages, table, lengths, b, h, page_size, pool, per_head,
                                     q.device, k_scale, v_scale)
            keys = torch.cat([kc.float(), k_block[b, h].float()])
            vals = torch.cat([vc.float(), v_block[b, h].float()])
            s = torch.matmul(q[b, h * g:(h + 1) * g].float(), keys.T) * scale
            out[b, h * g:(h + 1) * g] = torch.matmul(torch.softmax(s, dim=-1), vals)
    _, _, pscores, tscores = paged_attention_reference(
        q, k_pages, v_pages, page_table, kv_len, scale=scale,
        return_page_scores=return_page_scores, return_token_scores=return_token_scores, k_scale=k_scale,
        v_scale=v_scale)
    return out.to(q.dtype), pscores, tscores


__all__ = [
    "AttentionOptions", "AttentionPlan", "block_attention", "block_attention_reference", "paged_attention",
    "paged_attention_reference", "plan_attention", "run_attention",
]
