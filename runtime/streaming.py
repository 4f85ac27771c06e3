"""Results as blocks commit: `Engine.stream` (an iterator), `Engine.async_stream` and
`Engine.async_generate` (asyncio), all over `Engine.generate` running in a worker thread.

At every block commit `Engine.generate` hands the running requests to a `CommitTracker`: it
ends those whose decoded text now holds a stop string (`runtime/sampling.py`), notes when the
first block committed, and, given `on_commit`, sends each request's new text as a `StreamEvent`;
as a request leaves the batch (finished, cancelled, failed) it sends its last one.
Text still open to change is held back: the characters that could begin a stop string that the
next block completes, and a trailing incomplete UTF-8 character (decoded as U+FFFD). A finished
request's last event carries the rest of its text and its `GenerationResult`; the texts of a
request's events add up to its result's text.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator

from runtime.decoding import GenerationResult, SequenceState
from runtime.sampling import StopScan, result_text

if TYPE_CHECKING:
    from runtime.engine import Engine
    from runtime.tokenizer import Tokenizer


@dataclass
class StreamEvent:
    """What one request gained at one block commit (or, finished=True, its end)."""

    request_id: str
    text: str  # new text since the request's previous event
    token_ids: list[int]  # new tokens since the previous event (the last event may have fewer: a stop cut)
    finished: bool = False
    finish_reason: str | None = None
    result: GenerationResult | None = None  # the finished event's


def request_text(tokenizer: "Tokenizer | None", seq: SequenceState, skip_special_tokens: bool) -> str:
    """The text of a request's generated tokens under its SamplingParams (special tokens, stop strings);
    without them, special tokens skipped as `skip_special_tokens` (EngineConfig's) says."""
    if tokenizer is None:
        return ""
    s = seq.request.sampling
    if s is None:
        return tokenizer.decode(seq.generated, skip_special_tokens=skip_special_tokens)
    return result_text(tokenizer.decode(seq.generated, skip_special_tokens=s.skip_special_tokens), s)


def sampled_result(result: GenerationResult, seq: SequenceState, tokenizer: "Tokenizer | None",
                   skip_special_tokens: bool) -> GenerationResult:
    """A result of a request made from SamplingParams: its text, stop reason and logprobs."""
    s = seq.request.sampling
    if s is None:
        return result
    logprobs = None
    if s.logprobs:
        got = seq.logprobs or {}
        logprobs = [got.get(p) for p in range(seq.prompt_len, seq.prompt_len + len(result.tokens))]
    return replace(result, text=request_text(tokenizer, seq, skip_special_tokens), stop_reason=seq.stop_reason, logprobs=logprobs)


class CommitTracker:
    """Engine.generate's per-commit work over the running rows (see the module's docstring)."""

    def __init__(self, engine: "Engine", on_commit: Callable[[StreamEvent], None] | None):
        self.engine, self.on_commit = engine, on_commit
        self.stops = StopScan()
        self.sent_chars: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.ended: set[int] = set()
        self.first_block_at: float | None = None

    def _decode(self, seq: SequenceState):
        tokenizer = self.engine.tokenizer
        sampling = seq.request.sampling
        skip = sampling.skip_special_tokens if sampling is not None else self.engine.config.skip_special_tokens
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip)

    def __call__(self, rows: list[SequenceState]) -> None:
        now = time.perf_counter()
        if self.first_block_at is None:
            self.first_block_at = now
        for seq in rows:
            if self.engine.tokenizer is not None:
                self.stops.check(seq, self._decode(seq))
            if self.on_commit is not None and seq.finish_reason is None:  # a finished one: `finish`, as it leaves
                self._send(seq, self._settled_text(seq))

    def _settled_text(self, seq: SequenceState) -> str:
        """The text of an unfinished request that no later block can change."""
        text = request_text(self.engine.tokenizer, seq, self.engine.config.skip_special_tokens)
        s = seq.request.sampling
        hold = max((len(stop) for stop in s.stop), default=1) - 1 if s is not None else 0
        text = text[: len(text) - hold] if hold else text
        return text.rstrip("\ufffd")

    def _send(self, seq: SequenceState, text: str, finished: bool = False,
              result: GenerationResult | None = None) -> None:
        chars, toks = self.sent_chars.get(seq.seq_id, 0), self.sent_tokens.get(seq.seq_id, 0)
        tokens = result.tokens if result is not None else seq.generated
        if not finished and len(text) <= chars and len(tokens) <= toks:
            return
        self.sent_chars[seq.seq_id] = max(chars, len(text))
        self.sent_tokens[seq.seq_id] = len(tokens)
        self.on_commit(StreamEvent(seq.request.request_id or str(seq.seq_id), text[chars:], list(tokens[toks:]),
                                   finished, result.finish_reason if result is not None else None, result))

    def finish(self, seq: SequenceState, result: GenerationResult) -> None:
        """The request's last event (once): the rest of its text and its result."""
        if self.on_commit is None or seq.seq_id in self.ended:
            return
        self.ended.add(seq.seq_id)
        self._send(seq, result.text, finished=True, result=result)

    def forget(self, seq: SequenceState) -> None:
        """Drop what is kept of an ended request (an open-ended call would keep every request's)."""
        for kept in (self.sent_chars, self.sent_tokens, self.stops.searched):
            kept.pop(seq.seq_id, None)
        self.ended.discard(seq.seq_id)


_DONE = object()


def _going(item: object) -> bool:
    """An item from the worker: False at its end; its exception raised here, in the consumer."""
    if isinstance(item, BaseException):
        raise item
    return item is not _DONE


def _sync_items(engine: "Engine", prompts, kwargs: dict) -> Iterator[object]:
    """A generate call in a worker thread: its events, then its results list, here. Leaving the
    loop early (break, an exception, closing the iterator) cancels the requests still running."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    worker = _start(engine, prompts, kwargs, events.put, stop)
    try:
        while _going(item := events.get()):
            yield item
    finally:
        stop.set()
        worker.join()


def _start(engine: "Engine", prompts, kwargs: dict, put: Callable[[object], None],
           stop: threading.Event) -> threading.Thread:
    """Run engine.generate(prompts, **kwargs) in a thread: events, then an exception or the
    results as a list, then _DONE, through put. stop.set() cancels what still runs."""
    asked = kwargs.pop("should_cancel", None)

    def cancel(request_id: str) -> bool:
        return stop.is_set() or (asked is not None and asked(request_id))

    def work() -> None:
        try:
            with engine.generate_lock:  # one generate at a time: calls from other threads wait here
                put(engine.generate(prompts, should_cancel=cancel, on_commit=put, **kwargs))
        except BaseException as err:  # handed to the consumer, who raises it
            put(err)
        finally:
            put(_DONE)

    thread = threading.Thread(target=work, name="dllm-engine", daemon=True)
    thread.start()
    return thread


def stream(engine: "Engine", prompts, **kwargs) -> Iterator[StreamEvent]:
    """Engine.stream: the events of a generate call running in a worker thread."""
    for item in _sync_items(engine, prompts, kwargs):
        if isinstance(item, StreamEvent):
            yield item


async def async_stream(engine: "Engine", prompts, **kwargs) -> AsyncIterator[StreamEvent]:
    """Engine.async_stream: the events of a generate call running in a worker thread, on the
    caller's event loop; leaving early (or the task being cancelled) cancels the requests."""
    async for item in _async_items(engine, prompts, kwargs):
        if isinstance(item, StreamEvent):
            yield item


async def async_generate(engine: "Engine", prompts, **kwargs):
    """Engine.async_generate: generate's results, awaited without blocking the event loop."""
    results = None
    async for item in _async_items(engine, prompts, kwargs):
        if not isinstance(item, StreamEvent):
            results = item
    return results


async def _async_items(engine: "Engine", prompts, kwargs: dict):
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    worker = _start(engine, prompts, kwargs, lambda item: loop.call_soon_threadsafe(items.put_nowait, item), stop)
    try:
        while _going(item := await items.get()):
            yield item
    finally:
        stop.set()
        await asyncio.to_thread(worker.join)
