"""Requests that arrive while a generate call runs (continuous batching across callers).

`Engine.generate(prompts, feed=RequestFeed(...))` keeps serving after its prompts: at every block
boundary the loop (`BlockDiffusionLoop.run`'s `arrivals`) takes what was put into the feed since,
and the new requests join the running batch as soon as a slot is free, as the call's own waiting
requests do. With nothing running or waiting the call sleeps on the feed; it returns once the feed
is closed and everything taken from it has finished. The server's engine thread runs one such
call for its whole life, and every HTTP request is `put` into its feed.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Iterable

from runtime.decoding import GenerationRequest


class RequestFeed:
    """A thread-safe queue of GenerationRequests for a running generate call.

    max_tokens: the longest context (prompt + new tokens) a fed request may reach. The call sizes
    its attention mode for `max_batch_size` sequences of that many tokens before any request has
    arrived, so a request that would need more is refused alone. None: the model's positions.
    """

    def __init__(self, max_tokens: int | None = None):
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"RequestFeed max_tokens={max_tokens} must be >= 1 (None: the model's positions)")
        self.max_tokens = max_tokens
        self._items: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, requests: Iterable[GenerationRequest]) -> None:
        """Queue requests; the running call takes them at its next block boundary."""
        requests = list(requests)
        if not all(isinstance(r, GenerationRequest) for r in requests):
            raise TypeError("RequestFeed.put takes GenerationRequests (SamplingParams.requests makes them)")
        with self._cond:
            if self._closed:
                raise RuntimeError("the feed is closed: its generate call takes no more requests")
            self._items.extend(requests)
            self._cond.notify_all()

    def close(self) -> None:
        """No more requests: the call finishes what it took and returns."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a request is queued or the feed is closed; True if one is queued."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed, timeout)
            return bool(self._items)

    def take(self, wait: bool = False) -> list[GenerationRequest] | None:
        """Everything queued now ([] if nothing). wait=True blocks until something is queued or the
        feed is closed. None: closed and empty, nothing will come any more."""
        with self._cond:
            if wait:
                self._cond.wait_for(lambda: self._items or self._closed)
            if not self._items and self._closed:
                return None
            items = list(self._items)
            self._items.clear()
            return items
