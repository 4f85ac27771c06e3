"""Paged-attention outputs against the fp32 references, one (row, KV head) at a time.

One relative error over a whole output lets the largest outputs decide it. A list of one token
has for out that token's V row; a list of L tokens a softmax-weighted mean of L rows, whose norm is
about sqrt(e / L) of a row's under random scores: 50 times smaller at 6554 tokens. A kernel that
skipped the last 10% of one such list (that head 34% wrong) scored 0.009 over the whole output
and passed the bf16 tolerance of 1e-2 (issue 38). Here every list, (row n, KV head h) with its
G query heads and T positions, is compared on its own, each measure against a tolerance derived
below, and a failure names the worst (row, KV head):

- out: the normwise relative error over the list's G*T*D values;
- lse: the largest absolute error over its G*T values (the relative error of the softmax
  denominator, which a missing tile moves by its share of the list's weight);
- token and page scores: -inf exactly at and past kv_len; on the valid entries, the largest
  error relative to the entry's own rounding scale (`_score_scale`);
- an empty list (kv_len 0, no block keys): out 0 and lse -inf exactly.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from gpu_kernels.merge import block_self_attention
from gpu_kernels.paged_attention import block_attention_reference, paged_attention_reference

# Unit roundoff (half an ulp of 1: the largest relative error of one rounding to nearest).
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FP32_ROUNDOFF = UNIT_ROUNDOFF[torch.float32]

# How far above its expected (root-mean-square) size an error that sums many independent
# roundings may go: the worst case of such a sum grows with its length (L * u), but the sum is
# Gaussian-like, so 4 standard deviations are rarely reached, and a normwise error over a list's
# G*T*D >= 16 values averages them further. A missing tile's error stays well above it (see
# `out_tolerance`).
SPREAD = 4.0

# Largest relative error of one softmax weight p in fp32, in u32: the exponent's argument
# a = s * scale * log2(e) and a - max each round once, and these tests' scores (random q and K,
# scale = head_dim ** -0.5) give a a standard deviation of log2(e), so |a| < 8 (5.5 of them) and
# |a - max| < 16: the argument moves by at most 24 u32, p by ln(2) * 24 < 17 u32; the GPU's
# approximate exp2 adds at most 2^-22 = 4 u32 (the reference's exp rounds correctly or nearly).
P_ROUNDING = 21.0


def out_tolerance(dtype: torch.dtype, keys: int) -> float:
    """Largest normwise relative error of one list's out (G*T*D values, over `keys` keys) against
    the fp32 reference on the same inputs.

    The kernel rounds out to q's dtype up to three times: p before p . v (16-bit tensor-core
    operands), the split partial (in q's dtype by default), the output. Each rounding errs by at
    most u, relative; over the list's values these errors are independent with mean 0 and rms
    u / sqrt(3) (p's too: each value of out is a sum over many p, and with random V its relative
    error is that of one rounding), so three of them give an rms of u. The rest is fp32, in the
    kernel and in the reference: each value of out sums `keys` products, whose roundings add up
    as a random walk to about sqrt(keys) u32 of the result, and every p is off by up to
    P_ROUNDING u32 on its own. The tolerance is SPREAD times the sum:
    4 * (u + (sqrt(keys) + 21) * u32). bf16 (u = 2^-8, about three significant digits): 0.0157
    at 32768 keys; fp16 (u = 2^-11): 0.0020; fp32: 4 * (22 + sqrt(keys)) u32 (7.5e-6 at 90 keys).

    A missing tile of n of a list's L keys takes its share of the softmax mass away, and with
    random V moves out by about sqrt(n / (L - n)) of its norm: a 64-key tile of 32768 keys by
    0.044, 2.8 times the bf16 tolerance; of 6554 keys by 0.1. (bf16 would miss a 64-key tile only
    past 262K keys: 64 / 262144 < 0.0157 ** 2.)
    """
    return SPREAD * (UNIT_ROUNDOFF[dtype] + (math.sqrt(keys) + P_ROUNDING) * FP32_ROUNDOFF)


def lse_tolerance(keys: int, lse_magnitude: float) -> float:
    """Largest absolute lse error of one list (`keys` keys, its largest |lse| `lse_magnitude`).

    lse is fp32 end to end, whatever q's dtype (the split partials' lse stay fp32), and its error
    is the relative error of the softmax denominator: a sum of `keys` positive terms, whose
    roundings walk to about sqrt(keys) u32 (held at SPREAD times that); the terms' own errors
    (P_ROUNDING u32 at most each, so at most that in their weighted mean); the log of the sum
    (approximate on the GPU: about 2^-22 absolute, 4 u32 with the ln 2 it is scaled by); and the
    last steps (max + log of the sum, times ln 2), which round values up to |lse|: at most
    4 u32 |lse| in the kernel's three steps (which work in log2: 1.44 |lse|) and 2 u32 |lse| in
    torch.logsumexp's two, 8 u32 |lse| with both. So (SPREAD * sqrt(keys) + 21 + 4 + 8 |lse|) u32:
    5.0e-5 at 32768 keys (|lse| 12). A missing tile of n of L keys moves lse by about n / L (its share of the
    softmax mass): 2.0e-3 for 64 of 32768 keys, 40 times the tolerance.
    """
    return (SPREAD * math.sqrt(keys) + P_ROUNDING + 4.0 + 8.0 * lse_magnitude) * FP32_ROUNDOFF


def score_tolerance(dtype: torch.dtype, head_dim: int, queries: int) -> float:
    """Largest error of a token (or page) score relative to its rounding scale (`_score_scale`),
    for one list's `queries` = G*T query rows of head_dim.

    A token score is scale * q_mean . k in fp32 (both kernels' scores, and the reference's). By
    the dot-product bound (Higham, Accuracy and Stability, 3.1), summing n terms errs by at most
    n * u32 * (sum of |terms|), whatever the cancellation; so every error below is bounded by the
    score's rounding scale, scale * mean_r(|q_r|) . |k| >= the sum of |terms|. The reference:
    the mean over `queries` rows, then the head_dim-term dot: (head_dim + queries) * u32. The
    kernel: head_dim-term dots on tensor cores (whose fp32 accumulation may truncate: 2 u32 per
    addition) and a sum over at most 2 * queries rows (its row tile is a power of two): at most
    2 * (head_dim + 2 * queries) * u32. With several row blocks a 16-bit kernel also rounds q_mean
    to a pair (q's dtype, its remainder), which leaves u^2 of it. Together
    (3 * head_dim + 5 * queries) * u32 + u^2: 7.6e-5 for bf16 at D = 128 and 128 queries.

    A worst-case bound, not a Gaussian one: scores carry no rounding to q's dtype and no long
    sums, so the bound is small enough as it is. A missing tile's scores are no scores at all:
    -inf or NaN where the kernel skipped them, or another call's, off by about a score's own size,
    which random inputs make 1 / (0.64 * sqrt(D * G * T)) of its scale: 0.012 at D = G*T = 128,
    160 times the tolerance.
    """
    u = UNIT_ROUNDOFF[dtype]
    return (3 * head_dim + 5 * queries) * FP32_ROUNDOFF + u * u


@dataclasses.dataclass(frozen=True)
class ListErrors:
    """One measure's error and tolerance per list: [N, Hkv] each, NaN where the list was not
    compared (empty lists, which `check_attention` checks exactly)."""
    measure: str
    error: torch.Tensor
    tolerance: torch.Tensor
    keys: torch.Tensor  # [N, Hkv] keys of each list (context plus block)

    def worst(self) -> tuple[int, int]:
        """(row, KV head) of the largest error relative to its tolerance."""
        ratio = torch.nan_to_num(self.error / self.tolerance, nan=-1.0)
        flat = int(ratio.argmax())
        return divmod(flat, ratio.shape[1])

    def failure(self) -> str | None:
        """What fails, naming the worst (row, KV head) and how many lists fail; None if none."""
        failing = int((self.error > self.tolerance).sum())
        if not failing:
            return None
        n, h = self.worst()
        return (f"{self.measure} of (row {n}, KV head {h}) over {int(self.keys[n, h])} keys: error "
                f"{float(self.error[n, h]):.3e} > tolerance {float(self.tolerance[n, h]):.3e} "
                f"({failing} of {self.error.numel()} lists fail)")


def _references(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                kv_len: torch.Tensor, scale: float, k_block: torch.Tensor | None, v_block: torch.Tensor | None,
                scores: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """fp32 reference (out, lse, page_scores, token_scores) on the kernel's (rounded) inputs; with
    the block's own K/V, out over [context, block] and lse its log-sum-exp over both."""
    qf, kf, vf = q.float(), k_pages.float(), v_pages.float()
    out, lse, page_scores, token_scores = paged_attention_reference(
        qf, kf, vf, page_table, kv_len, scale=scale, return_page_scores=scores, return_token_scores=scores)
    if k_block is not None:
        out, _, _ = block_attention_reference(qf, k_block.float(), v_block.float(), kf, vf, page_table, kv_len,
                                              scale=scale)
        _, block_lse = block_self_attention(qf, k_block, v_block, scale=scale)
        lse = torch.logaddexp(lse, block_lse)
    return out, lse, page_scores, token_scores


def _score_scale(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                 kv_len: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(page, token) rounding scales of the scores: the reference scores of |q| and |k|, scale *
    mean_r(|q_r|) . |k| per token (>= the sum of |q_mean_d * k_d| that a dot's roundings are
    bounded by) and its max over each page (which bounds the error of a page's max)."""
    _, _, page_scale, token_scale = paged_attention_reference(
        q.float().abs(), k_pages.float().abs(), v_pages.float(), page_table, kv_len, scale=scale,
        return_page_scores=True, return_token_scores=True)
    return page_scale, token_scale


def _nan_fails(error: torch.Tensor) -> torch.Tensor:
    """error with NaN (from a NaN output) made inf, so that it fails its tolerance."""
    return torch.nan_to_num(error, nan=math.inf, posinf=math.inf)


def _out_errors(out: torch.Tensor, ref: torch.Tensor, nonempty: torch.Tensor, keys: torch.Tensor) -> ListErrors:
    n, hkv = keys.shape
    got, want = out.double().reshape(n, hkv, -1), ref.double().reshape(n, hkv, -1)
    error = _nan_fails((got - want).norm(dim=-1) / want.norm(dim=-1))
    tolerance = torch.tensor([[out_tolerance(out.dtype, int(c)) for c in row] for row in keys.tolist()],
                             dtype=torch.float64)
    return ListErrors("out", torch.where(nonempty, error.cpu(), math.nan), tolerance, keys)


def _lse_errors(lse: torch.Tensor, ref: torch.Tensor, nonempty: torch.Tensor, keys: torch.Tensor) -> ListErrors:
    n, hkv = keys.shape
    got, want = lse.double().reshape(n, hkv, -1), ref.double().reshape(n, hkv, -1)
    error = _nan_fails(torch.where(nonempty.to(got.device)[..., None], (got - want).abs(), 0.0).amax(dim=-1)).cpu()
    magnitude = torch.where(nonempty.to(got.device)[..., None], want.abs(), 0.0).amax(dim=-1).cpu()
    tolerance = torch.tensor([[lse_tolerance(int(c), float(m)) for c, m in zip(kr, mr)]
                              for kr, mr in zip(keys.tolist(), magnitude.tolist())], dtype=torch.float64)
    return ListErrors("lse", torch.where(nonempty, error, math.nan), tolerance, keys)


def _score_errors(measure: str, got: torch.Tensor, ref: torch.Tensor, rounding_scale: torch.Tensor,
                  valid_entries: torch.Tensor, tolerance: float, keys: torch.Tensor) -> tuple[ListErrors, str | None]:
    """Errors of one score tensor [N, Hkv, entries] over its valid entries, relative to their
    rounding scale, and what is wrong outside them (NaN anywhere, or anything but -inf past kv_len)."""
    entries = torch.arange(got.shape[-1], device=got.device)
    valid = entries < valid_entries.to(got.device)[..., None]
    problems = []
    if torch.isnan(got).any():
        problems.append(f"{measure}: NaN (an entry never written) at {_first(torch.isnan(got))}")
    past_end = ~valid & (got != float("-inf"))
    if past_end.any():
        problems.append(f"{measure}: not -inf at or past kv_len at {_first(past_end)}")
    finite_ref = torch.isfinite(ref)
    if not torch.equal(finite_ref, valid):  # the reference's own -inf pattern: a fixture error
        problems.append(f"{measure}: the reference is not finite exactly below kv_len")
    diff = (got.double() - ref.double()).abs() / rounding_scale.double().clamp_min(torch.finfo(torch.float32).tiny)
    diff = torch.where(valid, _nan_fails(diff), 0.0)
    error = diff.amax(dim=-1).cpu() if got.shape[-1] else torch.zeros(keys.shape, dtype=torch.float64)
    has_entries = valid_entries.cpu() > 0
    errors = ListErrors(measure, torch.where(has_entries, error, math.nan),
                        torch.full(keys.shape, tolerance, dtype=torch.float64), keys)
    return errors, "; ".join(problems) or None


def _first(mask: torch.Tensor) -> str:
    """'(row n, KV head h, entry e)' of mask's first True, and how many there are."""
    n, h, e = (int(i) for i in mask.nonzero()[0])
    return f"(row {n}, KV head {h}, entry {e}) and {int(mask.sum()) - 1} more"


def attention_errors(got: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
                     q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                     kv_len: torch.Tensor, *, scale: float, k_block: torch.Tensor | None = None,
                     v_block: torch.Tensor | None = None) -> tuple[list[ListErrors], list[str]]:
    """Per-list errors of a kernel's (out, lse, page_scores, token_scores) against the fp32
    reference of these inputs (the inputs the kernel was given, kv_len [N, Hkv] or [N] the true
    lengths; lse and the scores may be None: not compared), and the exact conditions that fail:
    NaN, an empty list's out not 0 or lse not -inf, a non-empty list's lse not finite, scores not
    -inf past kv_len. Returns ([ListErrors of out, lse, page and token scores that were given],
    [failed exact conditions])."""
    out, lse, page_scores, token_scores = got
    n, hq, t, head_dim = q.shape
    hkv = page_table.shape[1] if page_table.dim() == 3 else k_pages.shape[1]
    g = hq // hkv
    kv_len = (kv_len if kv_len.dim() == 2 else kv_len[:, None].expand(n, hkv)).cpu()
    ref_out, ref_lse, ref_pages, ref_tokens = _references(
        q, k_pages, v_pages, page_table, kv_len.to(q.device), scale, k_block, v_block,
        scores=page_scores is not None or token_scores is not None)
    keys = kv_len.long() + (t if k_block is not None else 0)
    nonempty = keys > 0
    problems = []
    if out.dtype != q.dtype:
        problems.append(f"out is {out.dtype}, not q's {q.dtype}")
    if torch.isnan(out).any():
        problems.append(f"out: NaN in {int(torch.isnan(out).sum())} values (some never written)")
    rows_empty = (~nonempty).repeat_interleave(g, dim=1).to(out.device)  # [N, Hq]
    if (out[rows_empty] != 0).any():
        problems.append(f"out: not 0 for an empty list at (row, query head) "
                        f"{(rows_empty[..., None, None] & (out != 0)).nonzero()[0, :2].tolist()}")
    errors = [_out_errors(out, ref_out, nonempty, keys)]
    if lse is not None:
        if torch.isnan(lse).any():
            problems.append(f"lse: NaN in {int(torch.isnan(lse).sum())} values (some never written)")
        if (lse[rows_empty] != float("-inf")).any():
            problems.append("lse: not -inf for an empty list")
        if not torch.isfinite(lse[~rows_empty]).all():
            problems.append("lse: not finite for a list with keys")
        errors.append(_lse_errors(lse, ref_lse, nonempty, keys))
    if page_scores is not None or token_scores is not None:
        tolerance = score_tolerance(q.dtype, head_dim, g * t)
        page_scale, token_scale = _score_scale(q, k_pages, v_pages, page_table, kv_len.to(q.device), scale)
        pages_valid = -(-kv_len // k_pages.shape[-2])  # pages holding a valid token
        for measure, got_scores, ref_scores, rounding_scale, valid_entries in (
                ("page_scores", page_scores, ref_pages, page_scale, pages_valid),
                ("token_scores", token_scores, ref_tokens, token_scale, kv_len)):
            if got_scores is None:
                continue
            score_errors, problem = _score_errors(measure, got_scores, ref_scores, rounding_scale, valid_entries,
                                                  tolerance, kv_len.long())
            errors.append(score_errors)
            if problem:
                problems.append(problem)
    return errors, problems


def check_attention(got: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
                    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                    kv_len: torch.Tensor, *, scale: float, k_block: torch.Tensor | None = None,
                    v_block: torch.Tensor | None = None) -> None:
    """Assert that a kernel's (out, lse, page_scores, token_scores) (lse and scores may be None)
    match the fp32 reference of its inputs list by list (`attention_errors`), naming the worst
    (row, KV head) of each measure that fails."""
    errors, problems = attention_errors(got, q, k_pages, v_pages, page_table, kv_len, scale=scale,
                                        k_block=k_block, v_block=v_block)
    failures = problems + [f for f in (e.failure() for e in errors) if f]
    assert not failures, "; ".join(failures)


# The check these tests made before issue 38: one relative error over the whole out, and one over
# the whole finite lse, at these tolerances. Kept to show what it let through (the mutation tests).
WHOLE_OUTPUT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def passes_whole_output_check(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k_pages: torch.Tensor,
                              v_pages: torch.Tensor, page_table: torch.Tensor, kv_len: torch.Tensor, *,
                              scale: float) -> tuple[bool, float, float]:
    """The pre-issue-38 check of (out, lse) against the reference of these inputs (kv_len the true
    lengths): no NaN, lse infinite exactly where the reference's is, 0 out for empty lists, and the
    relative error of the whole out and of the whole finite lse under WHOLE_OUTPUT_TOLERANCE[q's
    dtype]. Returns (whether it passes, out's error, lse's error)."""
    ref_out, ref_lse, _, _ = paged_attention_reference(q.float(), k_pages.float(), v_pages.float(), page_table,
                                                       kv_len, scale=scale)
    n, hq = q.shape[:2]
    hkv = kv_len.shape[1] if kv_len.dim() == 2 else 1
    empty_rows = (kv_len.reshape(n, -1) == 0).repeat_interleave(hq // hkv, dim=1)

    def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
        return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))

    finite = torch.isfinite(ref_lse)
    out_error, lse_error = relative_error(out, ref_out), relative_error(lse[finite], ref_lse[finite])
    tolerance = WHOLE_OUTPUT_TOLERANCE[q.dtype]
    passes = (not torch.isnan(out).any() and not torch.isnan(lse).any()
              and torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and bool(torch.all(out[empty_rows] == 0))
              and out_error < tolerance and lse_error < tolerance)
    return passes, out_error, lse_error
