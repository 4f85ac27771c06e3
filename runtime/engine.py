"""The Python API a batch pipeline embeds: `Engine(config).generate(prompts) -> results`."""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from offload.streams import Streams, make_streams
from runtime.attention import AttentionMode, DenseAttention
from runtime.chat import ChatTemplate, Message, is_conversation
from runtime.checkpoint import load_forecast, load_model
from runtime.config import EngineConfig, ModelConfig
from runtime.decoding import DecodeSettings, GenerationRequest, GenerationResult, SequenceState
from runtime.feed import RequestFeed
from runtime.generate import BlockDiffusionLoop
from runtime.herald import HeraldAttention
from runtime.memory import (MemoryPlan, check_fits, check_weights_fit, gpu_free_bytes, kv_storage_dtype, largest_batch,
                            plan_memory)
from runtime.resident_sparse import MageAttention, QuestAttention
from runtime.sampling import RefusedPrompt, SamplingParams, expand_prompts
from runtime import streaming
from runtime.streaming import CommitTracker, StreamEvent, sampled_result
from runtime.model import Transformer, weight_bytes
from runtime.parallel import check_divisible, setup
from runtime.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_MODEL = CHECKPOINTS / "retrieval-6m"  # trained on the project's retrieval tasks (training/)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} needs CUDA, and this machine has none: use device='cpu' or 'auto'")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r}; choose auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def resolve_settings(config: EngineConfig, model: ModelConfig, tokenizer: Tokenizer | None) -> DecodeSettings:
    """Decoding constants, each from the first place that states it: the user's EngineConfig, then
    the checkpoint (config.json, generation_config.json, the tokenizer), then the published
    defaults of the model's family (runtime/families.py)."""
    family = model.family_defaults
    block = config.block_size or model.block_size or family.block_size
    if block is None:
        raise ValueError(f"neither the checkpoint (config.json block_size or bd_size) nor the {family.name} family "
                         "states a block size: set EngineConfig.block_size (--block-size)")
    mask_id = next((m for m in (config.mask_token_id, model.mask_token_id,
                                tokenizer.mask_token_id if tokenizer is not None else None,
                                family.mask_token_id) if m is not None), None)
    if mask_id is None:
        raise ValueError("no mask token id in the config, the checkpoint or its tokenizer: set EngineConfig.mask_token_id")
    if not 0 <= mask_id < model.vocab_size:
        raise ValueError(f"mask_token_id={mask_id} is outside the vocabulary of {model.vocab_size}")
    if config.stop_token_ids is not None:
        stop = tuple(config.stop_token_ids)
    else:  # a chat model ends its turn with a token only generation_config.json or the tokenizer may name
        stop = tuple(dict.fromkeys([*model.eos_token_ids, *(tokenizer.eos_token_ids if tokenizer else ())]))
        stop = stop or family.eos_token_ids
    rule = config.decoding or family.decoding
    sub_block = config.sub_block_size or (family.sub_block_size if rule == family.decoding else None)
    # a family's step count is per block of its own size; more steps than positions would unmask nothing
    steps = config.denoising_steps or min(family.denoising_steps or block, block)
    return DecodeSettings(
        block_size=block,
        steps=steps,
        unmasking=config.unmasking or family.unmasking,  # type: ignore[arg-type]
        threshold=config.confidence_threshold if config.confidence_threshold is not None else family.threshold,
        mask_token_id=int(mask_id),
        eos_token_ids=stop,
        prompt_causal=(config.prompt_attention or family.prompt_attention) == "causal",
        rule=rule,
        sub_block_size=sub_block,
    )


def load_chat_template(config: EngineConfig, tokenizer: Tokenizer | None) -> ChatTemplate | None:
    """The user's template file, else the checkpoint's own (None: it has none)."""
    if config.chat_template is not None:
        return ChatTemplate.from_file(config.chat_template, tokenizer.config if tokenizer is not None else None)
    return ChatTemplate.from_dir(config.model_path)


def refused_result(request_id: str, err: Exception) -> GenerationResult:
    """The result of a request refused before it ran (its prompt or settings): finish_reason
    "error", nothing generated, the reason in `error`."""
    return GenerationResult(request_id=request_id, prompt_tokens=0, tokens=[], text="", finish_reason="error",
                            blocks=0, denoising_passes=0, latency_s=0.0, error=f"refused: {err}")


def check_unique_ids(ids: Sequence[str]) -> None:
    """Refuse a call that names two requests alike: should_cancel and the results name requests by id."""
    first: dict[str, int] = {}
    for i, request_id in enumerate(ids):
        if request_id in first:
            raise ValueError(f"request_id {request_id!r} is given to prompts {first[request_id]} and {i} of this "
                             "generate call: ids must be unique within a call (should_cancel and the results name "
                             "requests by them; a prompt without an id takes its index as text)")
        first[request_id] = i


@dataclass
class RunStats:
    """What the last `generate` call did."""

    requests: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0
    cancelled: int = 0  # requests that ended with finish_reason "cancelled"
    errors: int = 0  # ... and with "error" (a pass over them failed; see BlockDiffusionLoop.run)
    first_block_s: float | None = None  # from the call's start to its first block commit
    interrupted: bool = False  # a KeyboardInterrupt ended the call (unfinished requests: "cancelled")

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0


class GenerationResults(list):
    """What `Engine.generate` returns: the results in prompt order, and `stats`, this call's RunStats."""

    def __init__(self, results: Sequence[GenerationResult], stats: RunStats):
        super().__init__(results)
        self.stats = stats


def interrupted(sequences: Sequence[SequenceState]) -> None:
    """A KeyboardInterrupt stopped the loop: the unfinished requests end "cancelled" with what they committed."""
    for seq in sequences:
        if seq.finish_reason is None:
            seq.block = seq.masked = None
            seq.finish_reason, seq.error = "cancelled", "interrupted (KeyboardInterrupt) before it finished"


class Engine:
    """Loads a checkpoint once; each `generate` call decodes a list of requests as batches."""

    def __init__(self, config: EngineConfig, model: Transformer | None = None, tokenizer: Tokenizer | None = None):
        """Load `config.model_path`, or take an already built `model` (random weights for speed runs).

        Under torchrun the engine is one rank of a tensor-parallel group (`tensor_parallel_size`,
        runtime/parallel.py): it loads its shard, and on CUDA runs on the GPU of its local rank."""
        self.device = resolve_device(config.device)
        self.tp = setup(config.tensor_parallel_size, self.device.type)
        if self.tp.enabled and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # torchrun's LOCAL_RANK
        self.config = config = config.for_device(self.device)  # device-dependent defaults decided once
        self.dtype = resolve_dtype(config.dtype, self.device)
        path = Path(config.model_path)
        # everything that can refuse the checkpoint or the settings runs before a weight is read
        model_config = ModelConfig.from_dir(path) if model is None else model.config
        check_divisible(model_config, self.tp.world_size)
        if model is not None and model.tp.world_size != self.tp.world_size:
            raise ValueError(f"the model given is split over {model.tp.world_size} ranks, the engine runs "
                             f"{self.tp.world_size}: build it with random_model(..., tp=TensorParallel(rank, world))")
        if tokenizer is None and (path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_dir(path)
        self.tokenizer = tokenizer
        self.chat_template = load_chat_template(config, tokenizer)
        self.settings = resolve_settings(config, model_config, tokenizer)
        self.forecast_weights: torch.Tensor | None = None  # herald's learned forecast, [L, Hkv, D, D]
        if config.mode == "herald" and config.sparse.forecast == "learned":
            if self.tp.enabled:
                raise ValueError("forecast='learned' runs on one GPU: its projections are not split over "
                                 "tensor-parallel ranks; use forecast='next-layer' with tensor_parallel_size > 1")
            self.forecast_weights = load_forecast(path, model_config).to(self.device)
        if model is None:
            if self.device.type == "cuda":
                free = self._free({}).get("gpu_free", gpu_free_bytes(self.device))
                check_weights_fit(weight_bytes(model_config, self.dtype, self.tp.world_size), self.dtype, free, str(path))
            model, _ = load_model(path, dtype=self.dtype, device=self.device, tp=self.tp)
        self.model, self.model_config = model.eval(), model.config
        # the fused kernels are Triton: CUDA only (the CPU runs the torch layer). Engines sharing a
        # model must not re-concatenate its weights each time: only a change of path does.
        if self.device.type == "cuda" and self.model.fused != config.fused_layers:
            self.model.set_fused(config.fused_layers)
        self.last_stats = RunStats()
        self.last_timeline: list[dict] = []  # herald: per-block selection / transfer / stall
        self.last_occupancy: dict[str, int] = {}  # what the mode still held when the run ended: all 0
        self._running_mode: AttentionMode | None = None  # the running call's, for occupancy()
        self._ids = itertools.count()
        self.generate_lock = threading.Lock()  # streaming/async calls and the server take turns on it
        # one set for every mode and loop the engine makes (offload/streams.py says why)
        self.streams: Streams | None = None
        if self.device.type == "cuda":
            self.streams = make_streams(self.device, prioritize=config.stream_priority)

    def make_mode(self, num_sequences: int, max_tokens: int) -> AttentionMode:
        backend = self.backend
        mode, sparse = self.config.mode, self.config.sparse
        self.check_memory(num_sequences, max_tokens)
        args = (self.model.local_config, num_sequences, max_tokens)  # the rank's heads and KV heads
        kv_dtype = kv_storage_dtype(self.config.kv_format, self.dtype)
        if mode == "dense":
            return DenseAttention(*args, page_size=sparse.page_size, dtype=self.dtype, device=self.device,
                                  backend=backend, kv_dtype=kv_dtype)
        if mode == "mage":
            return MageAttention(*args, self.dtype, self.device, backend, sparse)
        if mode == "quest":
            return QuestAttention(*args, self.dtype, self.device, backend, sparse)
        if mode == "herald":
            return HeraldAttention(*args, self.dtype, self.device, backend, sparse, streams=self.streams,
                                   progress=self.config.progress, kv_dtype=kv_dtype,
                                   forecast_weights=self.forecast_weights)
        raise ValueError(f"mode {mode!r} is not available")

    def make_loop(self, mode: AttentionMode, max_batch_size: int) -> BlockDiffusionLoop:
        graphs = self.config.cuda_graphs and self.device.type == "cuda" and self.backend == "triton"
        return BlockDiffusionLoop(self.model, mode, self.settings, max_batch_size, self.config.prefill_chunk_size,
                                  self.device, cuda_graphs=graphs, compute_stream=self.streams.compute if self.streams else None)

    @property
    def backend(self) -> str:
        backend = self.config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        return backend

    def _free(self, free: dict) -> dict:
        """Free-memory overrides for the planner: the caller's, else the configured GPU cap."""
        cap = self.config.gpu_memory_gib
        if cap is not None and self.device.type == "cuda" and "gpu_free" not in free:
            left = int(cap * 2**30) - torch.cuda.memory_allocated(self.device)
            free = dict(free, gpu_free=max(0, min(left, gpu_free_bytes(self.device))))
        return free

    def memory_plan(self, num_sequences: int, max_tokens: int, **free) -> MemoryPlan:
        """What `num_sequences` sequences of `max_tokens` tokens would take in the configured mode."""
        return plan_memory(self.model_config, self.config.mode, self.config.sparse, num_sequences, max_tokens,
                           self.dtype, self.device, self.settings.block_size, self.config.prefill_chunk_size,
                           tensor_parallel=self.tp.world_size, kv_format=self.config.kv_format, **self._free(free))

    def largest_batch(self, max_tokens: int, **free) -> int:
        """The most sequences of `max_tokens` tokens the configured mode fits in free memory now."""
        return largest_batch(self.model_config, self.config.mode, self.config.sparse, max_tokens, self.dtype,
                             self.device, self.settings.block_size, self.config.prefill_chunk_size,
                             tensor_parallel=self.tp.world_size, kv_format=self.config.kv_format, **self._free(free))

    def check_memory(self, num_sequences: int, max_tokens: int) -> MemoryPlan:
        """Refuse, before allocating, a batch that does not fit (the error says what would)."""
        plan = self.memory_plan(num_sequences, max_tokens)
        # every rank reads its free memory before any allocates, and all refuse or none does
        if not self.tp.agree(plan.fits):
            largest = self.tp.agree(self.largest_batch(max_tokens))
            if plan.fits:
                raise MemoryError(f"{plan.describe()}: fits on rank {self.tp.rank}, not on another rank of the "
                                  f"{self.tp.world_size}; at most {largest} such sequences fit on all of them")
            check_fits(plan, largest)
        return plan

    def _check_budget(self, seq: SequenceState) -> None:
        """A token budget must leave something to select: refuse a request whose context it would cover whole."""
        budget = self.config.sparse.budget_tokens
        if self.config.mode == "dense" or budget is None or seq.prefix_len > budget:
            return
        raise ValueError(
            f"budget_tokens={budget} is not smaller than the {seq.prefix_len}-token context of request "
            f"{seq.request.request_id or seq.seq_id}: lower the budget, give it as budget_fraction, or use "
            "mode='dense'")

    def apply_chat_template(self, messages: list[Message]) -> str:
        """The prompt text of a conversation under the checkpoint's chat template, the assistant's
        turn opened (what `generate` decodes for a conversation prompt)."""
        if self.chat_template is None:
            raise ValueError(f"{self.config.model_path} has no chat template (chat_template.jinja or "
                             "tokenizer_config.json's chat_template): pass the prompt as text, or give a template "
                             "with EngineConfig(chat_template=PATH) (--chat-template)")
        return self.chat_template.render(messages, add_generation_prompt=True)

    def _encode(self, request: GenerationRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, str) or is_conversation(prompt):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model_path} has no tokenizer.json: pass prompts as token id lists")
            ids = self._encode_text(prompt)  # type: ignore[arg-type]
        else:  # GenerationRequest let only integers >= 0 through
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"request {request.request_id!r} has an empty prompt: give at least one token")
        bad = [(i, t) for i, t in enumerate(ids) if t >= self.model_config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {[t for _, t in bad[:5]]} (first at position {bad[0][0]}) are outside "
                             f"the vocabulary of {self.model_config.vocab_size}")
        return ids

    def _encode_text(self, prompt: str | list[Message]) -> list[int]:
        """Token ids of a text or conversation prompt. The text is plain text: special tokens' text
        in it stays characters unless `EngineConfig.parse_special_tokens`; a conversation's template
        markers are control tokens, its messages' contents plain text. The mask token never comes
        out of text: [MASK] marks what is still to be generated, and a prompt is fixed context."""
        tokenizer, parse = self.tokenizer, self.config.parse_special_tokens
        assert tokenizer is not None
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, parse_special_tokens=parse)
        else:
            if self.chat_template is None:
                self.apply_chat_template(prompt)  # raises, saying how to give a template
            text, spans = self.chat_template.render_with_spans(prompt, add_generation_prompt=True)
            if spans is None and not parse:
                smuggled = [(i, tokenizer.special_tokens_in(str(m.get("content", "")))) for i, m in enumerate(prompt)]
                smuggled = [(i, found) for i, found in smuggled if found]
                if smuggled:
                    i, found = smuggled[0]
                    raise ValueError(
                        f"chat message {i} holds the text of control tokens {found}, and the chat template in "
                        f"{self.chat_template.source} does not copy message contents verbatim, so they cannot be "
                        "kept as plain text: remove them, or set EngineConfig(parse_special_tokens=True) "
                        "(--parse-special-tokens) to read them as control tokens")
            ids = tokenizer.encode(text, parse_special_tokens=True, literal_spans=() if parse else spans or ())
        mask = self.settings.mask_token_id
        if mask in ids:
            how = ("parse_special_tokens=True read its text as the control token" if parse
                   else "the chat template wrote it")
            raise ValueError(f"the prompt holds the mask token {tokenizer.backend.id_to_token(mask)!r} (id {mask}) at "
                             f"token {ids.index(mask)} ({how}): [MASK] marks the positions still to be generated and "
                             "never belongs in a prompt; remove it from the text")
        return ids

    def make_sequence(self, request: GenerationRequest) -> SequenceState:
        seq_id = next(self._ids)
        ids = self._encode(request)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(request.seed))  # a numpy integer seed as well
        seq = SequenceState(seq_id=seq_id, request=request, prompt_ids=ids,
                            block_size=self.settings.block_size, generator=generator)
        limit = self.model_config.max_position_embeddings
        if seq.max_tokens > limit:
            raise ValueError(
                f"request {request.request_id or seq_id}: prompt of {len(ids)} tokens + {request.max_new_tokens} new "
                f"tokens reaches position {seq.max_tokens} (rounded up to whole blocks), beyond the model's "
                f"{limit} positions: shorten the prompt or lower max_new_tokens"
            )
        return seq

    def _admit(self, request: GenerationRequest, capacity: int | None = None) -> SequenceState:
        """A request as a sequence of this call, or ValueError saying why it cannot run (its prompt,
        its length, the token budget; capacity: the positions a running batch holds per sequence)."""
        seq = self.make_sequence(request)
        self._check_budget(seq)
        if capacity is not None and seq.max_tokens > capacity:
            raise ValueError(
                f"request {request.request_id}: prompt of {seq.prompt_len} tokens + {request.max_new_tokens} new "
                f"tokens reaches position {seq.max_tokens}, beyond the {capacity} positions per sequence the running "
                "batch was sized for (RequestFeed.max_tokens): shorten the prompt or lower max_new_tokens")
        return seq

    def feed_capacity(self, feed: RequestFeed) -> int:
        """The positions per sequence a generate call serving `feed` sizes its mode for: the feed's
        max_tokens in whole blocks, at most the model's positions."""
        limit = self.model_config.max_position_embeddings
        b = self.settings.block_size
        return min(-(-(feed.max_tokens or limit) // b) * b, limit)

    def occupancy(self) -> dict[str, int]:
        """What the running generate call's attention mode holds now (sequences, KV slots, host
        pages...), else what the last call's held when it ended: all 0 once no request holds KV."""
        mode = self._running_mode
        return mode.occupancy() if mode is not None else dict(self.last_occupancy)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str | list[int] | list[Message] | GenerationRequest],
                 should_cancel: Callable[[str], bool] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_commit: Callable[[StreamEvent], None] | None = None, feed: RequestFeed | None = None,
                 **defaults) -> GenerationResults:
        """Decode every prompt; results come back in the order of `prompts`.

        A prompt is text, token ids, a conversation (a list of {"role", "content"} messages, which
        the checkpoint's chat template turns into text with the assistant's turn opened), or a
        GenerationRequest holding one of these; `defaults` (max_new_tokens, temperature, top_k,
        top_p, seed, stop_at_eos) apply to the prompts not given as requests.
        should_cancel(request_id) is asked before each pass of each request (ids are the requests'
        `request_id`, or their index as text); a cancelled request returns what it had committed,
        with finish_reason "cancelled", and frees its memory at once. A request a failed pass
        touched returns what it had committed with finish_reason "error" and the failure in
        `error`, and the others are served as if nothing had happened (`BlockDiffusionLoop.run`
        says what can and cannot be isolated); `last_stats` counts both. A prompt refused before
        it runs (not integer token ids, empty, characters the tokenizer cannot represent, beyond the
        model's positions, no chat template) comes back the same way, alone, its reason in `error`;
        bad `defaults` and request ids given twice refuse the whole call (ValueError).
        Prompt text is plain text: special tokens written in it stay characters unless
        `EngineConfig.parse_special_tokens`; result text leaves special tokens out unless
        `EngineConfig.skip_special_tokens` is False (or a request's SamplingParams say otherwise).

        sampling_params (runtime.sampling.SamplingParams, one or one per prompt) is vLLM's way to
        say the same for prompts not given as requests, with stop strings, n, logprobs...; n > 1
        gives n results per prompt in a row, ids "i.k". on_commit(StreamEvent) is called at every
        block commit with each request's new text, and once with its result as it ends (finished,
        cancelled or failed; `Engine.stream` is built on it). A KeyboardInterrupt ends the call
        with every result: the unfinished ones "cancelled" (stats.interrupted). The returned
        list's `stats` are this call's (`last_stats` too).

        feed (runtime.feed.RequestFeed): the call also serves the requests put into it while it
        runs, each joining the running batch at the next block boundary (continuous batching); it
        returns when the feed is closed and everything is done. The mode is sized up front for
        `max_batch_size` sequences of the feed's max_tokens. A fed request's results go out only
        through on_commit (its last event carries its GenerationResult) and are not kept: an
        open-ended call holds nothing of the requests it finished. `stats` count them too; a fed
        request that cannot run (as a refused prompt above, or longer than the feed allows, or an
        id that a running request has) ends alone with finish_reason "error".
        """
        if sampling_params is not None:
            prompts = expand_prompts(prompts, sampling_params)
        prompts = list(prompts)  # walked twice below: an iterator would be empty the second time
        if defaults:  # a bad default is the call's mistake, not one prompt's: refused for the call
            GenerationRequest(prompt=[0], **defaults)
        ids: list[str] = []  # every prompt's request id (its index as text when it names none)
        refused: dict[int, GenerationResult] = {}  # prompt index -> its error result
        sequences: list[SequenceState] = []
        index_of: dict[int, int] = {}  # seq_id -> prompt index
        for i, p in enumerate(prompts):
            named = isinstance(p, (GenerationRequest, RefusedPrompt)) and p.request_id is not None
            ids.append(p.request_id if named else str(i))
        if not ids and feed is None:
            return []
        check_unique_ids(ids)
        capacity = None if feed is None else self.feed_capacity(feed)
        for i, p in enumerate(prompts):
            # a bad prompt (floats, bytes, empty, characters the tokenizer lacks, too long, shorter than the
            # token budget) fails alone
            if isinstance(p, RefusedPrompt):  # its SamplingParams could not make its request
                refused[i] = refused_result(ids[i], p.error)
                continue
            try:
                r = p if isinstance(p, GenerationRequest) else GenerationRequest(prompt=p, **defaults)
                seq = self._admit(r if r.request_id == ids[i] else replace(r, request_id=ids[i]), capacity)
            except ValueError as err:
                refused[i] = refused_result(ids[i], err)
                continue
            sequences.append(seq)
            index_of[seq.seq_id] = i
        if not sequences and feed is None:
            results = [refused[i] for i in range(len(ids))]
            self.last_stats = RunStats(len(results), 0, 0.0, errors=len(results))
            return GenerationResults(results, self.last_stats)
        t0 = time.perf_counter()
        if feed is None:
            batch, max_tokens = min(self.config.max_batch_size, len(sequences)), max(s.max_tokens for s in sequences)
        else:
            batch, max_tokens = self.config.max_batch_size, capacity
        mode = self.make_mode(batch, max_tokens)
        self._running_mode = mode
        loop = self.make_loop(mode, batch)
        b = self.settings.block_size

        def blocks(s: SequenceState) -> int:
            return (s.max_tokens - s.prefix_len) // b

        bar = tqdm(total=sum(blocks(s) for s in sequences), unit="block", desc=f"generate [{self.config.mode}]",
                   disable=not self.config.progress, leave=False)
        commits = CommitTracker(self, on_commit)
        ended: dict[int, GenerationResult] = {}  # seq_id -> result, of this call's own prompts
        fed_live: dict[int, SequenceState] = {}  # fed sequences taken and not yet ended
        fed_results: list[tuple[str, int]] = []  # (finish_reason, tokens) of each fed request that ended
        live_ids = set(ids)
        stopped = False

        def on_block(rows: list[SequenceState]) -> None:
            bar.update(len(rows))
            commits(rows)  # stop strings end requests here; streamed text goes out
            early = sum(blocks(s) - s.blocks_done for s in rows if s.finish_reason is not None)
            if early:  # the total counts the blocks that run: a request ending early takes its rest off
                bar.total -= early
                bar.refresh()

        def on_end(seq: SequenceState) -> None:
            now = time.perf_counter()
            result = self._result(seq, now - (seq.started_at or now))
            commits.finish(seq, result)
            live_ids.discard(result.request_id)
            if seq.seq_id in index_of:
                ended[seq.seq_id] = result
            else:
                fed_live.pop(seq.seq_id, None)
                fed_results.append((result.finish_reason, len(result.tokens)))
                commits.forget(seq)

        def refuse_fed(request_id: str, err: Exception) -> None:
            result = refused_result(request_id, err)
            fed_results.append(("error", 0))
            if on_commit is not None:
                on_commit(StreamEvent(request_id, "", [], True, "error", result))

        def arrivals(idle: bool) -> list[SequenceState] | None:
            taken = feed.take(wait=idle)
            if taken is None:
                return None
            admitted = []
            for r in taken:
                r = r if r.request_id is not None else replace(r, request_id=f"fed-{next(self._ids)}")
                try:
                    if r.request_id in live_ids:
                        raise ValueError(f"request_id {r.request_id!r} is taken by a request this call still "
                                         "runs: ids must be unique among running requests")
                    seq = self._admit(r, capacity)
                except ValueError as err:
                    refuse_fed(r.request_id, err)
                    continue
                live_ids.add(r.request_id)
                fed_live[seq.seq_id] = seq
                bar.total += blocks(seq)
                admitted.append(seq)
            return admitted

        try:
            cancel = None if should_cancel is None else (lambda seq: should_cancel(seq.request.request_id))
            loop.run(sequences, on_block, cancel, arrivals if feed is not None else None, on_end)
        except KeyboardInterrupt:  # the loop released every running request: keep what they have
            stopped = True
            interrupted([*sequences, *fed_live.values()])
        except BaseException:
            with contextlib.suppress(Exception):  # a broken device must not hide why the run stopped
                self._close_mode(mode)
            raise
        finally:
            bar.close()
        self._close_mode(mode)
        wall = time.perf_counter() - t0
        for seq in [*sequences, *fed_live.values()]:  # interrupted: they end here
            if seq.seq_id not in ended:
                on_end(seq)
        results = [refused.get(i) for i in range(len(ids))]
        for s in sequences:
            results[index_of[s.seq_id]] = ended[s.seq_id]
        reasons = [r.finish_reason for r in results] + [reason for reason, _ in fed_results]
        self.last_stats = RunStats(len(reasons), sum(len(r.tokens) for r in results) + sum(n for _, n in fed_results),
                                   wall, cancelled=reasons.count("cancelled"), errors=reasons.count("error"),
                                   first_block_s=None if commits.first_block_at is None else commits.first_block_at - t0,
                                   interrupted=stopped)
        return GenerationResults(results, self.last_stats)

    def _close_mode(self, mode: AttentionMode) -> None:
        """Keep what the run left behind for inspection (timeline, occupancy), then free the mode."""
        self._running_mode = None
        try:
            self.last_timeline = list(mode.timeline)
            self.last_occupancy = mode.occupancy()
        finally:
            mode.close()

    def _result(self, seq: SequenceState, latency: float) -> GenerationResult:
        tokens = seq.generated
        text = "" if self.tokenizer is None else self.tokenizer.decode(
            tokens, skip_special_tokens=self.config.skip_special_tokens)
        result = GenerationResult(
            request_id=seq.request.request_id or str(seq.seq_id),
            prompt_tokens=seq.prompt_len,
            tokens=tokens,
            text=text,
            finish_reason=seq.finish_reason or "length",
            blocks=seq.blocks_done,
            denoising_passes=seq.passes,
            latency_s=latency,
            error=seq.error,
        )
        return sampled_result(result, seq, self.tokenizer, self.config.skip_special_tokens)

    def stream(self, prompts: Sequence, **kwargs) -> Iterator[StreamEvent]:
        """generate(prompts, **kwargs) as an iterator of StreamEvents, each request's new text as its
        blocks commit (the engine works in a thread meanwhile). Leaving the loop early cancels the
        requests still running."""
        return streaming.stream(self, prompts, **kwargs)

    def async_stream(self, prompts: Sequence, **kwargs) -> AsyncIterator[StreamEvent]:
        """`stream` for asyncio: `async for event in engine.async_stream(prompts, ...)`."""
        return streaming.async_stream(self, prompts, **kwargs)

    async def async_generate(self, prompts: Sequence, **kwargs) -> GenerationResults:
        """`generate` for asyncio: awaited without blocking the event loop (calls take turns)."""
        return await streaming.async_generate(self, prompts, **kwargs)
