"""Herald's per-block statistics: pages selected and fetched, fetch and lookahead times, stalls.

Counters live on the device, so passes replayed from CUDA graphs count too; a closed block's
counters go to the host behind its work (a pinned copy and an event), and its timeline entry is
written once they have arrived, so closing a block never waits for the device.
"""
from __future__ import annotations

import time

import torch

# what the device counters hold, in order
_SELECTED, _FETCHED, _PREFETCHED, _DRAFT_SHARED, _STEP0_SELECTED, _FORECAST_FETCHED = range(6)


class BlockTimeline:
    """One entry per block (see `entries`). unit_bytes: bytes of one (page, KV head) unit, K and V."""

    def __init__(self, unit_bytes: int, num_layers: int, device: torch.device):
        self.unit_bytes, self.device = unit_bytes, device
        self.cuda = device.type == "cuda"
        self.counters = torch.zeros(6, dtype=torch.int64, device=device)
        # per layer: pages of its exact step-0 selection the layer before forecast, and pages selected
        self.forecast_counters = torch.zeros(num_layers, 2, dtype=torch.int64, device=device)
        self._entries: list[dict] = []
        self._closed: list[dict] = []  # blocks whose counters are still on their way to the host
        self._block: dict = {}
        self._select_t0 = 0.0

    # counting, inside a block's passes (device work: a captured pass counts on every replay)

    def count_fetch(self, selected: torch.Tensor, fetched: torch.Tensor) -> None:
        """Step 0 of a layer: pages its selection lists and pages it gathered (device scalars)."""
        self.counters[_SELECTED:_FETCHED + 1] += torch.stack([selected, fetched])

    def count_prefetch(self, fetched: torch.Tensor) -> None:
        """The lookahead of a layer: pages gathered for the next block."""
        self.counters[_PREFETCHED] += fetched

    def count_draft_recall(self, shared: torch.Tensor, selected: torch.Tensor) -> None:
        """Pages the block's own step-0 queries select (`selected`), of them `shared` the draft chose."""
        self.counters[_DRAFT_SHARED:_STEP0_SELECTED + 1] += torch.stack([shared, selected])

    def count_forecast_fetch(self, fetched: torch.Tensor) -> None:
        """A forecast for the next layer: pages gathered beside this layer's attention."""
        self.counters[_FORECAST_FETCHED] += fetched

    def count_forecast(self, layer: int, shared: torch.Tensor, selected: torch.Tensor) -> None:
        """Step 0 of `layer`: pages its exact selection lists (`selected`), of them `shared` the
        forecast made at the layer before had chosen."""
        self.forecast_counters[layer] += torch.stack([shared, selected])

    def selecting(self) -> None:
        """The host starts a layer's selection (host time, for the cpu sources' scans)."""
        self._select_t0 = time.perf_counter()

    def selected(self) -> None:
        if self._block:
            self._block["select_host_ms"] += (time.perf_counter() - self._select_t0) * 1e3

    @property
    def fetch_events(self) -> list:
        """Where eager fetches of this block append their (start, end) events."""
        return self._block.setdefault("events", [])

    def lookahead_joined(self, start: torch.cuda.Event, side_done: torch.cuda.Event,
                         main_ready: torch.cuda.Event) -> None:
        """The main stream joined the block's lookahead: when the side pass started and ended, and
        when the main stream reached the join."""
        if self._block:
            self._block["side_events"] = (start, side_done, main_ready)

    # opening and closing blocks

    def start_block(self, rows: int, context: int, replayed: bool) -> None:
        """A block's step 0 begins: close the last one and zero the counters behind it."""
        self.finish_block()
        self.counters.zero_()
        self.forecast_counters.zero_()
        self._block = dict(rows=rows, context=context, select_host_ms=0.0, events=[], replayed=replayed)

    def finish_block(self) -> None:
        """Close the open block: its counters go to the host behind its work (no wait)."""
        block = self._block
        if not block:
            return
        self._block = {}
        if self.cuda:
            for name in ("counters", "forecast_counters"):
                block[name] = torch.empty(getattr(self, name).shape, dtype=torch.int64, pin_memory=True)
                block[name].copy_(getattr(self, name), non_blocking=True)
            block["copied"] = torch.cuda.Event()
            block["copied"].record()
        else:
            block["counters"], block["forecast_counters"] = self.counters.clone(), self.forecast_counters.clone()
        self._closed.append(block)
        self._record_closed(wait=False)

    def entries(self) -> list[dict]:
        """Every block's entry (the open one closed first): rows, context tokens, host time of the
        selection at step 0 (scans included for the cpu sources), GPU time of the fetches, pages
        selected and fetched; with the lookahead, the GPU time of its side pass and how long the
        main stream stalled for it; with the forecast, its recall (overall and per layer)."""
        self.finish_block()
        self._record_closed(wait=True)
        return self._entries

    def close(self) -> None:
        """Resolve the closed blocks (their pinned counters are freed with them)."""
        self._record_closed(wait=True)

    def _record_closed(self, wait: bool) -> None:
        """Entries of the closed blocks whose counters have reached the host (all of them if
        `wait`), in block order."""
        while self._closed:
            block = self._closed[0]
            if "copied" in block and not block["copied"].query():
                if not wait:
                    return
                block["copied"].synchronize()  # the side pass and the fetches' events are done too
            self._closed.pop(0)
            selected, fetched, prefetched, shared, exact, forecast_fetched = block["counters"].tolist()
            forecast_hits, forecast_of = block["forecast_counters"].sum(0).tolist()
            by_layer = [hits / of if of else None for hits, of in block["forecast_counters"].tolist()]
            lookahead_ms = stall_ms = None
            if "side_events" in block:
                start, side_done, main_ready = block["side_events"]
                lookahead_ms = start.elapsed_time(side_done)
                stall_ms = max(0.0, main_ready.elapsed_time(side_done))
            self._entries.append(dict(
                rows=block["rows"], context=block["context"], select_host_ms=block["select_host_ms"],
                # GPU time of the fetches, when step 0 ran eagerly (a replayed graph has no per-layer events)
                fetch_ms=None if block["replayed"] and not block["events"] else
                sum(s.elapsed_time(e) for s, e in block["events"]),
                pages_selected=selected, pages_fetched=fetched, bytes_fetched=fetched * self.unit_bytes,
                # fetched during this block for the next one, on the side stream (lookahead)
                pages_prefetched=prefetched, bytes_prefetched=prefetched * self.unit_bytes,
                # share of the pages this block's step-0 queries select that the last block's draft chose
                draft_recall=shared / exact if exact else None,
                # GPU time of the LOOKAHEAD side pass (compute, scan and gather), and of it the time the
                # main stream waited at the commit: the part of the prefetch not hidden
                lookahead_ms=lookahead_ms, lookahead_stall_ms=stall_ms,
                # share of the pages each layer's exact step-0 selection lists that the layer before
                # had forecast and fetched early (SparseConfig.forecast); None where none was made
                forecast_recall=forecast_hits / forecast_of if forecast_of else None,
                pages_forecast_fetched=forecast_fetched, bytes_forecast_fetched=forecast_fetched * self.unit_bytes,
                forecast_recall_by_layer=by_layer,
            ))
