"""Block-diffusion decoding: requests, per-sequence state, and the unmasking rule.

A sequence is written block by block. Block k covers absolute positions [k*B, (k+1)*B): blocks are
aligned to the start of the sequence as SDAR aligns them, so the prompt's tail shares the first
generated block and stays fixed there while the rest of the block starts as [MASK]. At each
denoising step the model predicts every masked position; the most confident predictions are
unmasked, either a fixed number per step (SDAR's static schedule) or all above a confidence
threshold and at least one (Fast-dLLM v2 / SDAR's dynamic schedule).

Fast-dLLM v2's rule (`DecodeSettings.token_shift`) reads the logits shifted by one: position i is
predicted from the logits at i - 1, so a block's first position is decoded autoregressively from
the last logits before it (the finished previous block's, or a whole-block prompt's), and it
unmasks the block's sub-blocks left to right (`sub_block_size`). runtime/families.py says which
family decodes how.

Nothing here touches attention or the KV cache: `runtime/generate.py` drives the passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from runtime.fields import check_sampling_fields, is_int, refuser, shown
from runtime.sampling import SamplingParams, min_p_filter


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


_refuse = refuser("GenerationRequest")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and how to continue it: text, token ids, or a conversation (a list of
    {"role", "content"} messages, rendered with the checkpoint's chat template).

    Every field is checked here, so a bad value is refused where it was written, naming the field,
    the value and what is allowed, instead of failing later inside a pass (a float token count as a
    torch.Size error, a seed past 64 bits as an overflow, float token ids silently truncated)."""

    prompt: str | list[int] | list[dict[str, Any]]
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_at_eos: bool = True
    request_id: str | None = None
    # the rest of its sampling parameters (min-p, stop strings and ids, logprobs...): made by
    # SamplingParams.requests, which copies the fields above from the same object
    sampling: SamplingParams | None = None

    def __post_init__(self) -> None:
        _check_prompt(self.prompt)
        check_sampling_fields(_refuse, self.max_new_tokens, self.temperature, self.top_k, self.top_p)
        if not is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            raise _refuse("seed", self.seed, f"must be an integer in [0, 2**64 - 1 = {SEED_MAX}]")
        if not isinstance(self.stop_at_eos, (bool, np.bool_)):
            raise _refuse("stop_at_eos", self.stop_at_eos, "must be True or False")
        if self.request_id is not None and not isinstance(self.request_id, str):
            raise _refuse("request_id", self.request_id, f"must be a str or None (e.g. str({self.request_id!r}))")


def _check_prompt(prompt: object) -> None:
    """Text, a conversation, or a non-empty sequence of token ids that are integers >= 0 (the
    vocabulary's upper end is the engine's to check: it knows the model)."""
    if isinstance(prompt, str):
        if not prompt:
            raise _refuse("prompt", prompt, "is empty; give at least one character or token id")
        return
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise _refuse("prompt", prompt, "bytes are neither text nor token ids: decode them to str first "
                                        "(e.g. prompt.decode('utf-8')) or give a list of int token ids")
    if not isinstance(prompt, (list, tuple)):
        hint = " (an array or tensor of ids: pass ids.tolist())" if hasattr(prompt, "tolist") else ""
        raise _refuse("prompt", prompt, f"must be a str, a list of int token ids or a list of chat messages{hint}")
    if not prompt:
        raise _refuse("prompt", prompt, "is empty; give at least one character or token id")
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return  # a conversation (runtime.chat.is_conversation): the chat template checks its messages
    # type(t) is int first: a 128K-token prompt pays ~10 ms, not the ABC check per token
    bad = [(i, t) for i, t in enumerate(prompt) if not (type(t) is int or is_int(t)) or t < 0]
    if bad:
        i, t = bad[0]
        raise ValueError(f"GenerationRequest prompt: token id {shown(t)} at position {i} is not an integer >= 0 "
                         f"({len(bad)} such of {len(prompt)}); token-id prompts take integer ids only (floats and "
                         "bools are not truncated or converted), text prompts a str")


@dataclass
class GenerationResult:
    request_id: str
    prompt_tokens: int
    tokens: list[int]
    text: str
    finish_reason: Literal["eos", "stop", "length", "cancelled", "error"]
    blocks: int
    denoising_passes: int
    latency_s: float
    error: str | None = None  # finish_reason "error": what failed (tokens: those committed before it)
    stop_reason: str | int | None = None  # finish_reason "stop": the stop string or stop token id
    logprobs: list[float | None] | None = None  # SamplingParams(logprobs=True): one per token


@dataclass(frozen=True)
class DecodeSettings:
    """The per-engine decoding constants, resolved from EngineConfig and the checkpoint."""

    block_size: int
    steps: int
    unmasking: Literal["threshold", "fixed"]
    threshold: float
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    prompt_causal: bool
    rule: str = "sdar"  # sdar | fast_dllm_v2 (runtime/families.py)
    sub_block_size: int | None = None  # unmask the block's sub-blocks of this size left to right

    def __post_init__(self) -> None:
        sub = self.sub_block_size
        if sub is not None and (sub < 1 or self.block_size % sub):
            raise ValueError(f"sub_block_size={sub} must divide the block size {self.block_size}")
        if sub is not None and self.unmasking == "fixed":
            raise ValueError("sub-blocks (sub_block_size) unmask by threshold: use unmasking='threshold' "
                             "or sub_block_size=None")

    @property
    def token_shift(self) -> bool:
        """Fast-dLLM v2: block position i is predicted from the logits at i - 1, and a block's first
        position from the last logits before the block."""
        return self.rule == "fast_dllm_v2"


@dataclass
class SequenceState:
    """Where one request stands: committed tokens, the block being denoised, its random stream."""

    seq_id: int
    request: GenerationRequest
    prompt_ids: list[int]
    block_size: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # committed: prompt + finished blocks
    # [B] int64, current block's tokens ([MASK] where masked), and [B] bool. On the host; the loop keeps
    # the live copy on the device while a block runs, so these hold the block as it started and as it ended
    block: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    step_quota: list[int] = field(default_factory=list)  # fixed schedule: tokens to unmask per step
    finish_reason: str | None = None
    error: str | None = None  # why the sequence ended with finish_reason "error"
    blocks_done: int = 0
    passes: int = 0
    started_at: float = 0.0
    stop_reason: str | int | None = None  # finish_reason "stop": the stop string or token id it met
    logprobs: dict[int, float] | None = None  # SamplingParams.logprobs: position -> chosen token's logprob

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefix_len(self) -> int:
        """Prompt positions prefilled before the first generated block (whole blocks only)."""
        return self.prompt_len // self.block_size * self.block_size

    @property
    def max_tokens(self) -> int:
        """Positions the sequence may reach: its last block ends at a block boundary."""
        last = self.prompt_len + self.request.max_new_tokens
        return -(-last // self.block_size) * self.block_size

    @property
    def context_len(self) -> int:
        """Positions whose KV is committed: the current block starts here."""
        return len(self.tokens)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


def start_block(seq: SequenceState, settings: DecodeSettings) -> None:
    """Open the next block: committed prompt tail (if any) fixed, the rest [MASK]."""
    start = len(seq.tokens) // settings.block_size * settings.block_size
    fixed = seq.tokens[start:]
    block = torch.full((settings.block_size,), settings.mask_token_id, dtype=torch.int64)
    block[: len(fixed)] = torch.tensor(fixed, dtype=torch.int64)
    seq.block = block
    seq.masked = block == settings.mask_token_id
    seq.masked[: len(fixed)] = False
    seq.tokens = seq.tokens[:start]
    seq.step_quota = fixed_schedule(int(seq.masked.sum()), settings.steps)


def fixed_schedule(num_masked: int, steps: int) -> list[int]:
    """How many tokens each step unmasks: an even split, the remainder to the first steps."""
    base, extra = divmod(num_masked, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def finish_block(seq: SequenceState, settings: DecodeSettings, next_token: int | None = None) -> None:
    """Commit the finished block's tokens and decide whether the sequence is done.

    next_token (token shift): the next block's first token, decoded from this block's last
    logits; it is committed with the block (and counts as generated)."""
    assert seq.block is not None and seq.masked is not None and not seq.masked.any()
    seq.tokens.extend(seq.block.tolist())
    if next_token is not None:
        seq.tokens.append(int(next_token))
    seq.block = seq.masked = None
    seq.blocks_done += 1
    generated = seq.generated
    extra = seq.request.sampling.stop_ids if seq.request.sampling is not None else ()
    if (seq.request.stop_at_eos and settings.eos_token_ids) or extra:
        eos = settings.eos_token_ids if seq.request.stop_at_eos else ()
        for i, tok in enumerate(generated):
            if tok in eos:
                seq.tokens = seq.tokens[: seq.prompt_len + i]
                seq.finish_reason = "eos"
                return
            if tok in extra:
                keep = i + 1 if seq.request.sampling.include_stop_str_in_output else i
                seq.tokens = seq.tokens[: seq.prompt_len + keep]
                seq.finish_reason, seq.stop_reason = "stop", tok
                return
    if len(generated) >= seq.request.max_new_tokens:
        seq.tokens = seq.tokens[: seq.prompt_len + seq.request.max_new_tokens]
        seq.finish_reason = "length"


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits: [B, V] fp32; returns logits with everything outside top-k / nucleus set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def propose(logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator,
            mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A candidate token and its confidence at every block position.

    logits: [B, V] fp32. Returns (tokens [B] int64, confidence [B] fp32). [MASK] is never proposed.
    """
    logits = logits.float().clone()
    logits[:, mask_token_id] = float("-inf")
    if request.temperature == 0.0:
        probs = logits.softmax(-1)
        conf, tokens = probs.max(-1)
        return tokens, conf
    logits = _filter_logits(logits / request.temperature, request.top_k, request.top_p)
    if request.sampling is not None:
        logits = min_p_filter(logits, request.sampling.min_p)
    probs = logits.softmax(-1)
    tokens = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    conf = probs.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, conf


def shift_logits(logits: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
    """logits [..., B, V] of a block -> the logits each block position is predicted from.

    Token shift (Fast-dLLM v2): position i reads the logits at i - 1. Position 0 keeps its own;
    it is never masked (the prompt's, or decoded by `next_block_token` before the block opened).
    Other rules: the logits as they are."""
    if not settings.token_shift:
        return logits
    return torch.cat([logits[..., :1, :], logits[..., :-1, :]], dim=-2)


def next_block_token(last_logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Token shift: the next block's first token from the logits [N, V] of the position before it,
    greedy as Fast-dLLM v2 decodes it whatever the temperature. Returns [N] int64 on their device."""
    return propose_greedy(last_logits[:, None], mask_token_id)[0][:, 0]


def open_positions(masked: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
    """[..., B] bool: the masked positions a step may unmask. All of them; with sub-blocks only
    those of the first sub-block that still has one (left to right, as Fast-dLLM v2 decodes)."""
    sub = settings.sub_block_size
    if sub is None:
        return masked
    b = masked.shape[-1]
    pos = torch.arange(b, device=masked.device)
    first = torch.where(masked, pos, b).amin(-1, keepdim=True)  # b where nothing is masked
    start = first // sub * sub
    return masked & (pos >= start) & (pos < start + sub)


def unmask_step(seq: SequenceState, logits: torch.Tensor | None, step: int, settings: DecodeSettings,
                proposal: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Apply one denoising step's prediction to the sequence's block.

    logits: [B, V] each block position is predicted from (`shift_logits`), or `proposal`, what
    `propose` made of them. Unmasks the most confident open positions (`open_positions`): the fixed
    schedule's quota for this step, or every one above the threshold (at least one). The last
    allowed step unmasks whatever remains, so a block never takes more than `steps` passes.
    """
    assert seq.block is not None and seq.masked is not None
    if proposal is None:
        proposal = propose(logits, seq.request, seq.generator, settings.mask_token_id)
    tokens, conf = proposal[0].cpu(), proposal[1].cpu()
    masked = seq.masked
    remaining = int(masked.sum())
    if remaining == 0:
        return
    last = step >= settings.steps - 1
    candidates = masked if last else open_positions(masked, settings)
    conf = torch.where(candidates, conf, torch.full_like(conf, -1.0))
    if last:
        count = remaining
    elif settings.unmasking == "fixed":
        count = min(seq.step_quota[step], remaining)
    else:
        count = max(1, int((conf >= settings.threshold).sum()))
    if count == 0:
        return
    chosen = torch.topk(conf, count).indices  # open positions rank first: the others have conf -1
    seq.block[chosen] = tokens[chosen]
    masked[chosen] = False


def propose_greedy(logits: torch.Tensor, mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`propose` at temperature 0 for a whole pass, left on the logits' device (no host sync).

    logits: [N, B, V]. Returns (tokens [N, B] int64, confidence [N, B] fp32): the softmax maximum
    with [MASK] excluded, as `propose` computes it.
    """
    scores = logits.float()
    if scores is logits:  # never edit the caller's logits (a replayed graph's output buffer)
        scores = scores.clone()
    scores[..., mask_token_id].fill_(float("-inf"))
    conf, tokens = scores.softmax(-1).max(-1)
    return tokens, conf


def unmask_rows(block: torch.Tensor, masked: torch.Tensor, tokens: torch.Tensor, conf: torch.Tensor, step: int,
                settings: DecodeSettings, quota: torch.Tensor | None) -> torch.Tensor:
    """`unmask_step` for N rows at once, on their device and in place, without a host sync.

    block: [N, B] int64 tokens ([MASK] where masked); masked: [N, B] bool; tokens, conf: [N, B]
    proposals (int64, fp32); quota: [N] int64, the fixed schedule's count for this step (None for
    threshold unmasking). Per row, the `count` most confident open positions (`open_positions`)
    are unmasked, count being the quota (at most what remains), or every position at or above the
    threshold (at least one), or all that remain at the last step. Ties rank in position order (a
    stable sort). Returns [N] int64: the masked positions each row has left.
    """
    remaining = masked.sum(-1)
    last = step >= settings.steps - 1
    candidates = masked if last else open_positions(masked, settings)
    conf = torch.where(candidates, conf, torch.full_like(conf, -1.0))
    if last:
        count = remaining
    elif settings.unmasking == "fixed":
        assert quota is not None, "the fixed schedule needs each row's quota"
        count = torch.minimum(quota.to(remaining.dtype), remaining)
    else:
        above = (conf >= settings.threshold).sum(-1)
        count = torch.where(remaining > 0, above.clamp(min=1), 0)
    order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(conf.shape[-1], device=conf.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    # boolean indexing would sync (it counts the chosen positions on the host): select with where
    chosen = (rank < count[:, None]) & candidates
    block.copy_(torch.where(chosen, tokens, block))
    masked &= ~chosen
    return remaining - chosen.sum(-1)
