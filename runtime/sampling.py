"""Sampling parameters per request, in the shape vLLM's `SamplingParams` and SGLang's
`sampling_params` dict have: one object says how to continue a prompt, `Engine.generate(prompts,
sampling_params=...)` takes one for all prompts or one per prompt.

`SamplingParams.requests(prompt, request_id)` turns it into the engine's `GenerationRequest`s: the
fields the decoding loop always read (temperature, top-k, top-p, seed, max new tokens, eos) are
copied onto the request, the rest rides along as `GenerationRequest.sampling` and is read where
it acts: min-p and the min-new-tokens rule when a position's token is proposed
(`suppressed_logits`, `runtime/decoding.propose`), stop token ids when a block commits
(`runtime/decoding.finish_block`), logprobs by the loop (`runtime/generate.py`), stop strings on the
decoded text after each commit (`match_stop`, `runtime/streaming.py`) and the text of the result
(`result_text`). `n` > 1 makes n requests whose seeds derive from the seed (`derived_seed`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from runtime.fields import check_sampling_fields, is_int, is_real, refuser

if TYPE_CHECKING:
    from runtime.decoding import GenerationRequest, SequenceState

SEED_LIMIT = 2**63  # seeds are drawn below this (torch.Generator takes 64 bits)


_refuse = refuser("SamplingParams")


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. Checked when made: a bad value raises ValueError naming the field.

    temperature 0 is greedy; top_k / top_p / min_p filter what sampling draws from (min_p keeps
    tokens with at least min_p times the top token's probability). max_new_tokens / min_new_tokens
    bound the generated tokens (before min_new_tokens, eos and stop_token_ids are never proposed).
    Generation stops at the checkpoint's eos (unless ignore_eos), at any of stop_token_ids (the
    token left out of the result unless include_stop_str_in_output), or when the decoded text
    contains one of `stop` (the text cut before it, or after it with include_stop_str_in_output);
    finish_reason is then "stop" and `stop_reason` says which. skip_special_tokens: the result
    text leaves special tokens out. n: that many continuations, seeds derived from `seed`.
    logprobs: each result carries the log-probability of every generated token under the
    model's distribution at the denoising step that unmasked it (temperature 1, no filter; None
    for a token the rule decoded outside a step, e.g. Fast-dLLM v2's first token of a block).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float = 0.0
    seed: int = 0
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    logprobs: bool = False

    def __post_init__(self) -> None:
        # lists are accepted where tuples are kept (the object is frozen and hashable)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        object.__setattr__(self, "stop", tuple(stop) if isinstance(stop, (list, tuple)) else stop)
        ids = self.stop_token_ids
        object.__setattr__(self, "stop_token_ids", tuple(ids) if isinstance(ids, (list, tuple)) else ids)
        check_sampling_fields(_refuse, self.max_new_tokens, self.temperature, self.top_k, self.top_p)
        if not is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise _refuse("min_p", self.min_p, "must be a number in [0, 1] (0: no min-p filter)")
        if not is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise _refuse("seed", self.seed, "must be an integer in [0, 2**63)")
        if not is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise _refuse("min_new_tokens", self.min_new_tokens,
                          f"must be an integer in [0, max_new_tokens={self.max_new_tokens}]")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise _refuse("stop", self.stop, "must be a list of non-empty strings")
        if not isinstance(self.stop_token_ids, tuple) or not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise _refuse("stop_token_ids", self.stop_token_ids, "must be a list of integer token ids >= 0")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise _refuse(name, getattr(self, name), "must be True or False")
        if not is_int(self.n) or self.n < 1:
            raise _refuse("n", self.n, "must be an integer >= 1")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "SamplingParams":
        """From a dict of field names (SGLang's `sampling_params` style); unknown names are refused."""
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"SamplingParams has no field {', '.join(map(repr, unknown))}: the fields are "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**options)

    def requests(self, prompt: Any, request_id: str) -> list["GenerationRequest"]:
        """The engine's requests for one prompt: one, or n with ids "ID.k" and derived seeds."""
        from runtime.decoding import GenerationRequest

        def one(k: int, rid: str) -> GenerationRequest:
            return GenerationRequest(prompt=prompt, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                     top_k=self.top_k, top_p=self.top_p, seed=derived_seed(self.seed, k),
                                     stop_at_eos=not self.ignore_eos, request_id=rid, sampling=self)
        if self.n == 1:
            return [one(0, request_id)]
        return [one(k, f"{request_id}.{k}") for k in range(self.n)]

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(self.stop_token_ids)


def derived_seed(seed: int, k: int) -> int:
    """The k-th continuation's seed: the seed itself for k = 0, else a hash of (seed, k) spread
    over 63 bits, so that n continuations of seeds s and s + 1 share no stream."""
    if k == 0:
        return seed
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0]) % SEED_LIMIT


@dataclass(frozen=True)
class RefusedPrompt:
    """A prompt whose request could not be made (empty, not integer ids, ...): it ends alone with
    `error`, under the id its request would have had."""

    request_id: str
    error: ValueError


def expand_prompts(prompts: Sequence[Any], sampling_params: "SamplingParams | Sequence[SamplingParams]") -> list:
    """prompts with their sampling parameters -> GenerationRequests (n > 1: n per prompt, in a row),
    or a RefusedPrompt per id where the prompt itself is refused (the others still run). A prompt
    already given as a GenerationRequest keeps its own settings. Ids: the prompt's index as text
    (with ".k" for n > 1)."""
    from runtime.decoding import GenerationRequest

    prompts = list(prompts)
    if isinstance(sampling_params, SamplingParams):
        per_prompt = [sampling_params] * len(prompts)
    else:
        per_prompt = list(sampling_params)
        if len(per_prompt) != len(prompts) or not all(isinstance(p, SamplingParams) for p in per_prompt):
            raise ValueError(f"sampling_params must be one SamplingParams or a list of one per prompt: got "
                             f"{len(per_prompt)} for {len(prompts)} prompts")
    out = []
    for i, (prompt, params) in enumerate(zip(prompts, per_prompt)):
        if isinstance(prompt, GenerationRequest):
            out.append(prompt)
        else:
            try:
                out.extend(params.requests(prompt, str(i)))
            except ValueError as err:
                ids = [str(i)] if params.n == 1 else [f"{i}.{k}" for k in range(params.n)]
                out.extend(RefusedPrompt(rid, err) for rid in ids)
    return out


def wants_row_path(request: "GenerationRequest") -> bool:
    """Whether a row's proposals need its own pass over the logits (sampling, min-p, min new
    tokens, logprobs) rather than the batch's greedy one."""
    s = request.sampling
    return request.temperature != 0.0 or (s is not None and (s.min_new_tokens > 0 or s.logprobs))


def suppressed_logits(logits: torch.Tensor, seq: "SequenceState", stop_ids: Sequence[int]) -> torch.Tensor:
    """A row's block logits [B, V] with its stop tokens (eos and stop_token_ids) ruled out at the
    positions before its min_new_tokens-th generated token; the logits themselves when none is."""
    s = seq.request.sampling
    if s is None or s.min_new_tokens == 0:
        return logits
    ids = sorted({*stop_ids, *s.stop_token_ids})
    start = seq.context_len // seq.block_size * seq.block_size  # the block's first position
    first_allowed = seq.prompt_len + s.min_new_tokens  # absolute position of the first token that may stop
    early = min(max(first_allowed - start, 0), logits.shape[0])
    if not ids or early == 0:
        return logits
    logits = logits.clone()
    logits[:early, ids] = float("-inf")
    return logits


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """logits [B, V] with every token below min_p times its row's top probability set to -inf."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def match_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in text[start:] (a stop string ending there may begin before
    start): (its index in text, the string), or None."""
    found = None
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i >= 0 and (found is None or i < found[0]):
            found = (i, stop)
    return found


def result_text(text: str, sampling: SamplingParams) -> str:
    """The finished text of a request: cut before its first stop string (after it with
    include_stop_str_in_output)."""
    found = match_stop(text, sampling.stop) if sampling.stop else None
    if found is None:
        return text
    i, stop = found
    return text[: i + len(stop)] if sampling.include_stop_str_in_output else text[:i]


@dataclass
class StopScan:
    """Per request, how far its decoded text was searched for stop strings (they may straddle
    a block boundary: the next search starts a stop string's length before the end)."""

    searched: dict[int, int] = field(default_factory=dict)

    def check(self, seq: "SequenceState", decode) -> bool:
        """After a commit: if seq's text now holds a stop string, cut its tokens to the shortest
        prefix whose text holds it, mark it finished ("stop") and return True."""
        s = seq.request.sampling
        if s is None or not s.stop or seq.finish_reason in ("cancelled", "error"):
            return False
        generated = seq.generated
        text = decode(generated)
        found = match_stop(text, s.stop, self.searched.get(seq.seq_id, 0))
        self.searched[seq.seq_id] = len(text)
        if found is None:
            return False
        lo, hi = 1, len(generated)  # the fewest tokens whose text holds the stop string (a binary search)
        while lo < hi:
            mid = (lo + hi) // 2
            if found[1] in decode(generated[:mid]):
                hi = mid
            else:
                lo = mid + 1
        keep = lo
        seq.tokens = seq.tokens[: seq.prompt_len + keep]
        seq.finish_reason, seq.stop_reason = "stop", found[1]
        return True
