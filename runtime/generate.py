"""The block-diffusion generation loop over a batch of sequences, with a KV cache.

Sequences wait in a queue and join the running batch at block boundaries (continuous batching at
block granularity); sequences that arrive while the loop runs (`run`'s `arrivals`, fed by a server
through `runtime/feed.py`) join that same queue. Per block: every running sequence opens a block, the batch runs denoising
passes until all its blocks are unmasked (a sequence whose block finished early sits out the
remaining passes), then one commit pass writes the blocks' final K/V. Each pass is planned once on
the attention mode and run layer by layer; the loop never knows which mode it drives.

Faults stay with the requests they touch: an exception from a prefill or from any pass of a block
ends that pass's rows with finish_reason "error" (or only the rows a `RequestError` names, while
the pass's other rows run their block again from its start), and the loop goes on serving the
rest. See `BlockDiffusionLoop.run`.
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from runtime.attention import AttentionMode, ForwardBatch, Phase, RequestError
from runtime.cuda_graphs import PassGraphs
from runtime.decoding import (DecodeSettings, SequenceState, finish_block, next_block_token, propose, propose_greedy,
                              shift_logits, start_block, unmask_rows)
from runtime.memory import out_of_memory
from runtime.model import Transformer
from runtime.sampling import suppressed_logits, wants_row_path
from offload.uploads import upload


@dataclass
class _BlockStart:
    """A running sequence as its block began: what the loop puts back to run the block again."""

    tokens: list[int]  # the committed list as it was (the loop only appends to it or rebinds it)
    num_tokens: int
    rng_state: torch.Tensor
    passes: int
    blocks_done: int

    @classmethod
    def of(cls, seq: SequenceState) -> "_BlockStart":
        # no copy of the tokens: a long context would pay one per row per block for a rare failure
        return cls(seq.tokens, len(seq.tokens), seq.generator.get_state(), seq.passes, seq.blocks_done)

    def restore(self, seq: SequenceState) -> None:
        """Back to the block's start: the next `decode_block` re-masks it and draws the same numbers."""
        seq.tokens = self.tokens[:self.num_tokens]
        seq.generator.set_state(self.rng_state)
        seq.passes, seq.blocks_done = self.passes, self.blocks_done
        seq.block = seq.masked = None
        seq.finish_reason = None


class BlockDiffusionLoop:
    """Drives a model and an attention mode through prefill, denoising and commit passes."""

    def __init__(self, model: Transformer, mode: AttentionMode, settings: DecodeSettings,
                 max_batch_size: int, prefill_chunk_size: int, device: torch.device, cuda_graphs: bool = False,
                 compute_stream: torch.cuda.Stream | None = None):
        """compute_stream (CUDA): the stream prefill and the passes run on (e.g. one of high priority,
        so that a mode's side stream yields to them); it joins the caller's stream on entry to
        `prefill`, `decode_block` and `run`, and the caller's stream joins it on return."""
        self.model = model
        self.mode = mode
        self.settings = settings
        self.max_batch_size = max_batch_size
        b = settings.block_size
        if prefill_chunk_size < b:
            raise ValueError(f"prefill_chunk_size={prefill_chunk_size} is smaller than the block size {b}")
        self.prefill_chunk = prefill_chunk_size // b * b  # chunks stay block-aligned
        self.device = device
        self.graphs = PassGraphs(model, mode, device) if cuda_graphs else None
        self.compute_stream = compute_stream
        self.last_block_ms: dict[str, float] = {}
        self._should_cancel: Callable[[SequenceState], bool] | None = None
        self._cancelled: list[SequenceState] = []
        self._last_pass: ForwardBatch | None = None  # the pass a failure is charged to (see run)
        self._callback_error: Exception | None = None  # should_cancel's own failure: propagates

    def _forward(self, phase: Phase, rows: list[SequenceState], tokens: torch.Tensor,
                 visibility_block: int, step: int = 0, positions: torch.Tensor | None = None,
                 wants_logits: bool = False) -> torch.Tensor | None:
        """tokens: [N, T] int64 (host or device). positions: [N, T] int64 on the device (None: built
        from the rows' contexts, a host-to-device copy). Returns fp32 logits [N, T, V] for
        denoising passes and those that ask for them (`wants_logits`), else None."""
        batch = ForwardBatch(
            phase=phase,
            seq_ids=tuple(s.seq_id for s in rows),
            context_lens=torch.tensor([s.context_len for s in rows], dtype=torch.int64),
            num_new=tokens.shape[1],
            visibility_block=visibility_block,
            step=step,
            wants_logits=wants_logits,
        )
        self._last_pass = batch
        # inputs reach the device on the current stream, before the plan orders a side pass after it
        tokens = tokens.to(self.device)
        if positions is None:
            positions = batch.positions(self.device)
        self.mode.plan(batch)
        side = self.mode.pass_stream(batch)
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
            # made on the current stream, read on the side one: the allocator must not hand their
            # memory to the current stream's next allocations before the side pass has read them
            tokens.record_stream(side)
            positions.record_stream(side)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if phase is not Phase.PREFILL and self.graphs is not None:
                return self.graphs.forward(batch, tokens, positions, side_pass=side is not None)
            return self.model(tokens, positions, self.mode, need_logits=batch.needs_logits)

    @contextlib.contextmanager
    def _on_compute_stream(self):
        """Run the body on `compute_stream`, ordered after and before the caller's stream's work
        (nested uses, e.g. run -> decode_block, cost nothing)."""
        stream = self.compute_stream
        caller = None if stream is None else torch.cuda.current_stream(self.device)
        if caller is None or caller == stream:
            yield
            return
        stream.wait_stream(caller)
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            caller.wait_stream(stream)

    def prefill(self, seq: SequenceState) -> None:
        """Write the KV of the prompt's whole blocks, chunk by chunk."""
        with self._on_compute_stream():
            self._prefill(seq)

    def _prefill(self, seq: SequenceState) -> None:
        settings = self.settings
        b = settings.block_size
        visibility = 1 if settings.prompt_causal else b
        prefix = seq.prompt_ids[: seq.prefix_len]
        # token shift: a prompt that ends on a block boundary decodes the first block's first token
        # from its last logits. Its last block runs as a chunk of its own, so that the pass makes
        # B positions of logits, not a whole chunk's (block-aligned chunks give the same K/V).
        first_token = settings.token_shift and 0 < len(prefix) == seq.prompt_len
        bounds = [*range(0, len(prefix), self.prefill_chunk), len(prefix)]
        if first_token and len(prefix) - bounds[-2] > b:
            bounds.insert(-1, len(prefix) - b)
        seq.tokens = []
        logits = None
        for start, end in zip(bounds, bounds[1:]):
            chunk = prefix[start:end]
            logits = self._forward(Phase.PREFILL, [seq], torch.tensor([chunk], dtype=torch.int64), visibility,
                                   wants_logits=first_token and end == len(prefix))
            seq.tokens.extend(chunk)
        seq.tokens = list(seq.prompt_ids)
        if first_token:
            seq.tokens.append(int(next_block_token(logits[:, -1], settings.mask_token_id)[0]))

    def _drop_cancelled(self, rows: list[SequenceState]) -> None:
        """Take cancelled sequences out of `rows` (in place) and give their KV back now, mid-block
        included; their unfinished block is dropped, committed tokens stay."""
        if self._should_cancel is None:
            return
        for seq in [s for s in rows if self._should_cancel(s)]:
            rows.remove(seq)
            self.mode.remove_sequence(seq.seq_id)
            seq.block = seq.masked = None
            seq.finish_reason = "cancelled"
            self._cancelled.append(seq)

    def decode_block(self, rows: list[SequenceState]) -> None:
        """Denoise one block of every row, then commit it. Rows cancelled meanwhile leave `rows`.

        The block's tokens and mask stay on the device from its first pass to its commit, and
        nothing waits for the device in between in the common case (greedy rows, the fixed
        schedule): the passes queue back to back, and the block comes to the host once, after the
        commit is queued (then `seq.block` / `seq.masked` hold it for `finish_block`). Sampling rows
        draw on the host, and threshold unmasking reads each row's remaining count back after every
        step but the last (which rows run the next step depends on it).

        The time of its parts lands in `last_block_ms` (step 0, the later steps, the commit): on
        CUDA measured on the compute stream by events, since the host only queues the passes; on
        the CPU, host wall time."""
        with self._on_compute_stream():
            self._decode_block(rows)

    def _decode_block(self, rows: list[SequenceState]) -> None:
        settings = self.settings
        b = settings.block_size
        clock = _PartClock(self.device)
        self._drop_cancelled(rows)
        for seq in rows:
            start_block(seq, settings)
        state = _DeviceBlock(rows, settings, self.device)
        for step in range(settings.steps):
            self._drop_cancelled(rows)
            active = [s for s in rows if state.remaining[s.seq_id] > 0]
            if not active:
                break
            at = state.index(active)
            block, masked = state.take(state.block, at), state.take(state.masked, at)
            logits = self._forward(Phase.DENOISE, active, block, b, step, state.positions(active, b))
            logits = shift_logits(logits, settings)
            tokens, conf = self._proposals(logits, active)
            quota = state.take(state.quota[:, step], at) if settings.unmasking == "fixed" else None
            before = masked.clone() if any(_wants_logprobs(s) for s in active) else None
            left = unmask_rows(block, masked, tokens, conf, step, settings, quota)
            if before is not None:
                self._record_logprobs(active, logits, tokens, before & ~masked)
            if at is not None:  # a subset ran: its rows' new state back into the block's
                state.block.index_copy_(0, at, block)
                state.masked.index_copy_(0, at, masked)
            state.count_remaining(active, left, step)
            for seq in active:
                seq.passes += 1
            if step == 0 and self.mode.wants_lookahead:
                self._lookahead(active, state, block, masked, tokens)
            if step == 0:
                clock.mark("step0_ms")
        clock.mark("steps_ms")
        self._drop_cancelled(rows)
        if not rows:
            return
        logits = self._forward(Phase.COMMIT, rows, state.take(state.block, state.index(rows)), b,
                               positions=state.positions(rows, b), wants_logits=settings.token_shift)
        # token shift: the next block's first token comes from this block's last logits
        next_tokens = None if logits is None else next_block_token(logits[:, -1], settings.mask_token_id)
        clock.mark("commit_ms")
        firsts = state.to_host(rows, next_tokens)  # the block's one wait for the device, behind the queued commit
        for seq in rows:
            finish_block(seq, settings, None if firsts is None else firsts[seq.seq_id])
        self.last_block_ms = {"step0_ms": 0.0, "steps_ms": 0.0, **clock.parts()}

    def _proposals(self, logits: torch.Tensor, rows: list[SequenceState]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [N, B, V] -> (tokens [N, B] int64, confidence [N, B] fp32) on the logits' device.
        Greedy rows are decided there together; sampling rows draw from their own generators (on
        the host: that waits for the pass)."""
        mask = self.settings.mask_token_id
        tokens, conf = propose_greedy(logits, mask)
        for i, seq in enumerate(rows):
            if wants_row_path(seq.request):
                stops = self.settings.eos_token_ids if seq.request.stop_at_eos else ()
                tokens[i], conf[i] = propose(suppressed_logits(logits[i], seq, stops), seq.request, seq.generator,
                                             mask)
        return tokens, conf

    def _record_logprobs(self, rows: list[SequenceState], logits: torch.Tensor, tokens: torch.Tensor,
                         unmasked: torch.Tensor) -> None:
        """SamplingParams.logprobs: the log-probability (the model's, [MASK] excluded) of each token
        a step unmasked, kept by absolute position in `seq.logprobs` (a block run again rewrites
        its positions). logits [N, B, V], tokens [N, B], unmasked [N, B] bool: this step's."""
        for i, seq in enumerate(rows):
            if not _wants_logprobs(seq):
                continue
            scores = logits[i].float().clone()
            scores[:, self.settings.mask_token_id] = float("-inf")
            chosen = scores.log_softmax(-1).gather(-1, tokens[i][:, None].to(scores.device))[:, 0]
            logprobs = seq.logprobs if seq.logprobs is not None else {}
            for pos in unmasked[i].nonzero()[:, 0].tolist():
                logprobs[seq.context_len + pos] = float(chosen[pos])
            seq.logprobs = logprobs

    def _lookahead(self, rows: list[SequenceState], state: "_DeviceBlock", block: torch.Tensor,
                   masked: torch.Tensor, tokens: torch.Tensor) -> None:
        """The LOOKAHEAD pass: each row's draft of this block (its step-0 argmax where still masked)
        followed by the next block all [MASK]; rows whose next block would pass their end sit out.
        block, masked: [N, B] the rows' state after step 0; tokens: [N, B] step 0's proposals."""
        b = self.settings.block_size
        keep = [i for i, seq in enumerate(rows) if seq.context_len + 2 * b <= seq.max_tokens]
        if not keep:
            return
        draft = torch.where(masked, tokens, block)  # device work: the side pass is ordered after it
        if len(keep) < len(rows):
            draft = draft.index_select(0, upload(torch.tensor(keep, dtype=torch.int64), self.device))
        drafts = torch.cat([draft, torch.full_like(draft, self.settings.mask_token_id)], dim=1)
        rows_next = [rows[i] for i in keep]
        self._forward(Phase.LOOKAHEAD, rows_next, drafts, b, positions=state.positions(rows_next, 2 * b))

    def run(self, sequences: Iterable[SequenceState],
            on_block: Callable[[list[SequenceState]], None] | None = None,
            should_cancel: Callable[[SequenceState], bool] | None = None,
            arrivals: Callable[[bool], list[SequenceState] | None] | None = None,
            on_end: Callable[[SequenceState], None] | None = None) -> list[SequenceState]:
        """Generate every sequence to completion; returns them in completion order.

        arrivals(idle) is asked at every block boundary for sequences that arrived since (a
        server's requests, `runtime/feed.py`): they queue behind the waiting ones and join the
        running batch as slots free up, like them. idle=True (nothing runs or waits) may block until
        some arrive; None means none will any more, and the run ends once the rest is done.
        on_end(seq) hears of each sequence as it leaves the batch (finished, cancelled or failed),
        at once rather than when the run returns; with it the run keeps none of them (an open-ended
        run would otherwise hold every request it ever served) and returns [].

        should_cancel(seq) is asked before a waiting sequence starts and before every pass of a
        running one; a cancelled sequence ends with finish_reason "cancelled" and its KV (pages,
        slots, cache partition) is released at once.

        Faults: an Exception raised while prefilling a sequence or while running a block (any of
        its passes, DENOISE, LOOKAHEAD or COMMIT, or the sampling of a pass's logits) is charged to
        the rows of that pass: they end with finish_reason "error" and the error's text in
        `seq.error`, keep the tokens committed before the failed block, and their KV is released
        through `mode.remove_sequence`; the loop goes on with the waiting sequences. A mode that
        knows which rows a failure touched raises `RequestError(seq_ids, message)`: then only
        those rows fail. Every other row of the interrupted block runs the block again from its
        start (re-masked, its sampling generator rewound to the block's start, `mode.restart_block`
        told), so its tokens are those of a fault-free run. The KV a failed pass may have half
        written lies beyond every row's committed context and is rewritten before anything reads it.
        KeyboardInterrupt and other BaseExceptions, errors of should_cancel itself, and
        AssertionErrors (a broken invariant of the runtime, such as `check_residency` finds: no
        state of the mode can be trusted then) propagate after every running sequence's KV was
        released. On CUDA an error that leaves the context unusable (an illegal memory access, a
        device-side assert: CUDA errors are sticky) cannot be isolated: the device is synchronised
        after every failure and, if that fails too, run() raises at once instead of failing the
        remaining requests one by one. An asynchronous kernel error surfaces at the next
        synchronisation, usually when the block's tokens reach the host after its commit was queued,
        and is charged to that pass (sampling rows and threshold unmasking meet it at a step).
        An allocation failure (CUDA out of memory, host memory, a pinned allocation) is such an
        exception; its rows' error then says what ran out and how much is free, and the rest of
        the run admits one sequence fewer at once than the failed pass held, so that the waiting
        requests are served rather than failing the same way.
        """
        with self._on_compute_stream():
            return self._run(sequences, on_block, should_cancel, arrivals, on_end)

    def _run(self, sequences: Iterable[SequenceState], on_block: Callable[[list[SequenceState]], None] | None,
             should_cancel: Callable[[SequenceState], bool] | None,
             arrivals: Callable[[bool], list[SequenceState] | None] | None,
             on_end: Callable[[SequenceState], None] | None) -> list[SequenceState]:
        waiting = deque(sequences)
        running: list[SequenceState] = []
        done: list[SequenceState] = []
        self._should_cancel = None if should_cancel is None else self._asking(should_cancel)
        self._cancelled = done

        def hand_over() -> None:  # the sequences that left since the last boundary go to on_end
            if on_end is not None:
                while done:
                    on_end(done.pop(0))

        try:
            while True:
                hand_over()
                if arrivals is not None:
                    more = arrivals(not waiting and not running)
                    if more is None:
                        arrivals = None
                    else:
                        waiting.extend(more)
                if not waiting and not running:
                    if arrivals is None:
                        break
                    continue
                while waiting and len(running) < self.max_batch_size:
                    seq = waiting.popleft()
                    if self._should_cancel is not None and self._should_cancel(seq):
                        seq.finish_reason = "cancelled"
                        done.append(seq)
                        continue
                    self.mode.add_sequence(seq.seq_id, seq.max_tokens)
                    running.append(seq)
                    seq.started_at = time.perf_counter()
                    self._last_pass = None
                    try:
                        self.prefill(seq)
                    except AssertionError:
                        raise
                    except Exception as err:
                        self._isolate(err, [seq], running, done, {})
                if not running:
                    continue
                starts = {s.seq_id: _BlockStart.of(s) for s in running}
                self._last_pass = None
                try:
                    self.decode_block(running)
                except AssertionError:
                    raise
                except Exception as err:
                    self._isolate(err, list(running), running, done, starts)
                    continue
                if on_block is not None:
                    on_block(running)
                for seq in [s for s in running if s.finish_reason is not None]:
                    running.remove(seq)
                    self.mode.remove_sequence(seq.seq_id)
                    done.append(seq)
            hand_over()
        except BaseException:
            for seq in running:  # best effort: a failed release must not hide why the run stopped
                with contextlib.suppress(Exception):
                    self.mode.remove_sequence(seq.seq_id)
            raise
        finally:
            self._should_cancel, self._cancelled = None, []
            self._last_pass = self._callback_error = None
        return done

    def _asking(self, should_cancel: Callable[[SequenceState], bool]) -> Callable[[SequenceState], bool]:
        """should_cancel, remembering its own failures: a broken callback is the caller's bug, not
        a fault of the requests, so run() lets it propagate."""
        def ask(seq: SequenceState) -> bool:
            try:
                return should_cancel(seq)
            except Exception as err:
                self._callback_error = err
                raise
        return ask

    def _isolate(self, err: Exception, block_rows: list[SequenceState], running: list[SequenceState],
                 done: list[SequenceState], starts: dict[int, _BlockStart]) -> None:
        """A prefill or block of `block_rows` raised `err`: end the rows it touched with "error"
        and release their KV; put the other rows of the block back to its start (see run)."""
        failed_pass, self._last_pass = self._last_pass, None
        if err is self._callback_error:
            raise err
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except Exception as fatal:
                raise RuntimeError(
                    f"the CUDA context is unusable after {type(err).__name__}: {err}; no request can be served "
                    "in this process any more: restart it") from fatal
        touched = [s for s in block_rows if failed_pass is None or s.seq_id in failed_pass.seq_ids] or block_rows
        if isinstance(err, RequestError):  # the mode says which rows; names outside the pass: all of it
            touched = [s for s in touched if s.seq_id in err.seq_ids] or touched
        message = f"{self._where(failed_pass)}: {type(err).__name__}: {err}"
        ran_out = out_of_memory(err, self.device)
        if ran_out is not None:
            message = f"{message}. {self._fit_after_oom(ran_out, len(failed_pass.seq_ids) if failed_pass else 1)}"
        failed_ids = {s.seq_id for s in touched}
        for seq in touched:
            if seq.seq_id in starts:
                starts[seq.seq_id].restore(seq)
            else:  # a prefill: nothing of the sequence was committed
                seq.tokens, seq.block, seq.masked = list(seq.prompt_ids), None, None
            running.remove(seq)
            self.mode.remove_sequence(seq.seq_id)
            seq.finish_reason, seq.error = "error", message
            done.append(seq)
        redo = [s for s in block_rows if s.seq_id not in failed_ids and s.seq_id in starts]
        for seq in redo:
            starts[seq.seq_id].restore(seq)
        if redo:
            self.mode.restart_block(tuple(s.seq_id for s in redo))

    def _fit_after_oom(self, ran_out: str, rows: int) -> str:
        """A pass of `rows` rows ran out of memory: the rest of the run admits fewer rows at once,
        so that the waiting requests are served instead of failing pass after pass; the message
        says so, and what to configure. A single row that does not fit cannot be helped here."""
        if rows <= 1:
            return (f"{ran_out}: even one sequence of this length did not fit the pass; shorten the prompt or "
                    "max_new_tokens, or free memory")
        self.max_batch_size = min(self.max_batch_size, rows - 1)
        return (f"{ran_out}: this run goes on with at most {self.max_batch_size} sequences at once; set "
                f"max_batch_size={self.max_batch_size} (or shorten the contexts) to stay within memory")

    @staticmethod
    def _where(batch: ForwardBatch | None) -> str:
        if batch is None:
            return "block"
        if batch.phase is Phase.DENOISE:
            return f"denoise pass (step {batch.step})"
        return f"{batch.phase.value} pass"


def _wants_logprobs(seq: SequenceState) -> bool:
    return seq.request.sampling is not None and seq.request.sampling.logprobs


class _PartClock:
    """Durations of a block's consecutive parts: `mark(name)` ends the part called `name` (a part
    marked twice ends at the second mark). On CUDA the marks are events on the current stream,
    read by `parts()` once the stream has passed them (the host only queues the passes, so its own
    clock would time the queueing); on the CPU the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: dict[str, object] = {}
        self._start = self._now()

    def _now(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, name: str) -> None:
        self._marks[name] = self._now()

    def parts(self) -> dict[str, float]:
        """{name: ms} per part, each from the previous mark (the first from the clock's start)."""
        out, last = {}, self._start
        for name, mark in self._marks.items():
            if self.cuda:
                mark.synchronize()
                out[name] = last.elapsed_time(mark)
            else:
                out[name] = (mark - last) * 1e3
            last = mark
        return out


class _DeviceBlock:
    """The running rows' block on the loop's device for the whole block, and what the host knows
    of it without asking the device.

    block: [N, B] int64, masked: [N, B] bool, quota: [N, steps] int64 (the fixed schedule), rows
    in the order the block started with; `remaining` (host) counts each row's masked positions.
    Index and position tensors are uploaded once per block and row set.
    """

    def __init__(self, rows: list[SequenceState], settings: DecodeSettings, device: torch.device):
        self.settings, self.device = settings, device
        self.row_of = {s.seq_id: i for i, s in enumerate(rows)}
        self.remaining = {s.seq_id: int(s.masked.sum()) for s in rows}
        self.quota: torch.Tensor | None = None  # the fixed schedule only
        if rows:
            self.block = upload(torch.stack([s.block for s in rows]), device)
            self.masked = upload(torch.stack([s.masked for s in rows]), device)
            if settings.unmasking == "fixed":
                self.quota = upload(torch.tensor([s.step_quota for s in rows], dtype=torch.int64), device)
        self._indices: dict[tuple[int, ...], torch.Tensor | None] = {}
        self._positions: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}

    def index(self, rows: list[SequenceState]) -> torch.Tensor | None:
        """[n] int64 device index of `rows` into the block's rows (None: all of them, in order)."""
        key = tuple(self.row_of[s.seq_id] for s in rows)
        if key not in self._indices:
            everyone = key == tuple(range(len(self.row_of)))
            self._indices[key] = None if everyone else upload(torch.tensor(key, dtype=torch.int64), self.device)
        return self._indices[key]

    @staticmethod
    def take(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """The rows `index` names of t [N, ...] (t itself for all of them)."""
        return t if index is None else t.index_select(0, index)

    def positions(self, rows: list[SequenceState], num_new: int) -> torch.Tensor:
        """[n, num_new] int64 device positions of a pass over `rows` (built once per block)."""
        key = (tuple(s.seq_id for s in rows), num_new)
        if key not in self._positions:
            lens = torch.tensor([s.context_len for s in rows], dtype=torch.int64)  # fixed until the commit
            self._positions[key] = upload(lens[:, None] + torch.arange(num_new, dtype=torch.int64)[None, :],
                                          self.device)
        return self._positions[key]

    def count_remaining(self, rows: list[SequenceState], left: torch.Tensor, step: int) -> None:
        """After `step` ran over `rows`: their masked counts on the host. The fixed schedule's (and
        the last step's) are known in advance; threshold unmasking's depend on the confidences, so
        `left` [n] (device) comes to the host, the one wait such a step keeps."""
        settings = self.settings
        if step >= settings.steps - 1:
            counts = [0] * len(rows)
        elif settings.unmasking == "fixed":
            counts = [r - min(s.step_quota[step], r) for s, r in ((s, self.remaining[s.seq_id]) for s in rows)]
        else:
            counts = left.tolist()
        for seq, count in zip(rows, counts):
            self.remaining[seq.seq_id] = int(count)

    def to_host(self, rows: list[SequenceState], next_tokens: torch.Tensor | None = None) -> dict[int, int] | None:
        """The rows' block and mask into `seq.block` / `seq.masked`, in one device-to-host copy.
        next_tokens: [len(rows)] int64 on the device, a token per row of `rows` that comes along
        in the same copy; returned as {seq_id: token} (None without them)."""
        b = self.settings.block_size
        parts = [self.block, self.masked.to(torch.int64)]
        if next_tokens is not None:
            at = self.index(rows)
            if at is not None:  # some rows left mid-block: place each token on its row of the block
                next_tokens = torch.zeros_like(self.block[:, 0]).index_copy_(0, at, next_tokens)
            parts.append(next_tokens[:, None])
        host = torch.cat(parts, dim=1).cpu()
        for seq in rows:
            i = self.row_of[seq.seq_id]
            seq.block, seq.masked = host[i, :b].clone(), host[i, b:2 * b].bool()
        if next_tokens is None:
            return None
        return {seq.seq_id: int(host[self.row_of[seq.seq_id], 2 * b]) for seq in rows}
