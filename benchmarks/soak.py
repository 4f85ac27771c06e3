"""Soak: do hundreds of requests, cancellations and faults leave the engine's memory where it was?

For each mode: a warm-up call (kernels compile, allocators fill their caches), then the baseline;
then `--requests` requests of random prompt lengths and max_new_tokens (from `--seed`) through
`--calls` Engine.generate calls, some cancelled before they start and some while they run (through
should_cancel, so mid-block), optionally with injected faults (`--fault-rate`: per pass, a
RuntimeError failing the pass or a RequestError naming one of its rows, raised in the mode's plan
or in a random layer; on CUDA a pass replayed from a graph only sees plan faults). After every
call the mode must have held nothing when it closed (`Engine.last_occupancy`: slots, host pages,
rows, cache partitions), and at the end these must be back at the baseline:
- process RSS,
- the bytes of every live tensor's storage the garbage collector sees (any device): exact, where
  RSS also moves with the allocators' caches and code paths run for the first time,
- pinned host memory: HostKVStores still open (they page-lock with cudaHostRegister, which torch
  does not count) plus what torch's pinned allocator has handed out (index upload rings), exactly,
- on CUDA, torch.cuda.memory_allocated and memory_reserved after empty_cache, cuBLAS's per-stream
  workspaces cleared first.
RSS, tensor and GPU bytes may grow by a quarter of one KV page (of the model soaked, all layers, K
and V) per request, so a leak of a page per request fails; RSS also by a fixed warm-up term
(`RSS_WARM_UP_BYTES`, measured). Each check in the JSON states its allowed growth.
Every request must come back once, in prompt order, as length, eos, cancelled or (with faults) an
injected error; any other error fails the run. Triton must compile no kernel after the first call
(a kernel per request would be a leak of its own). Prints a line per call, a progress line every
`--progress-every` seconds and a table; writes JSON; exits 1 if anything did not return to the
baseline.

Long contexts on a device call: `--seconds` bounds each mode's soak (once it passes, every request
still running or waiting is cancelled at its next question and no further call starts);
`--random-context` loads each prompt's KV as random values instead of prefilling it, as
benchmarks.throughput does (a 128K prefill takes seconds; the soak is about what the engine keeps,
not about the prefill); `--transfer-fault-rate` fails host-store transfers through
`HostKVStore.fault_hook` (a gather of step 0 or of the lookahead, a commit's or prefill's write,
for one row's pages: that pass runs eagerly, as the hook runs on the host); `--in-flight-share`
turns that share of the mid-block cancellations into ones answered while the mode's side streams
(the lookahead's transfers) still run.

    python -m benchmarks.soak --requests 300 --modes dense mage quest herald             # CPU, tiny-random
    python -m benchmarks.soak --geometry qwen3-8b --context 32768 --requests 200 --modes herald-gpu-compact
    python -m benchmarks.soak --geometry qwen3-8b --context 131072 --min-prompt 32768 --random-context \
        --modes herald-lookahead --batch 2 --requests 300 --calls 3 --seconds 150 --fault-rate 0.01 \
        --transfer-fault-rate 0.005 --quiet                                        # one H100 device call
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import torch

from benchmarks.decode import GEOMETRIES, geometry, sync
from benchmarks.throughput import variants
from offload.host_store import HostKVStore
from offload.host_store import TransferFault
from runtime.attention import AttentionMode, ForwardBatch, Phase, RequestError
from runtime.checkpoint import load_model, random_model
from runtime.config import SELECTION_SOURCES, EngineConfig, ModelConfig, SparseConfig
from runtime.decoding import GenerationRequest, GenerationResult
from runtime.engine import CHECKPOINTS, Engine
from runtime.generate import BlockDiffusionLoop
from runtime.memory import kv_bytes_per_token

MiB = 2**20
DATA = Path(__file__).resolve().parent / "data"


# ------------------------------------------------------------------------------------------------
# memory


def tensor_bytes(objects: list) -> int:
    """Bytes of the storages behind the tensors among `objects`, each storage once, on any device."""
    storages: dict[tuple[str, int], int] = {}
    for o in objects:
        if issubclass(type(o), torch.Tensor) and o.layout is torch.strided and o.device.type != "meta":
            try:
                storage = o.untyped_storage()
            except (RuntimeError, NotImplementedError):  # a wrapper subclass: no storage of its own
                continue
            storages[(str(storage.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def memory_state(device: torch.device) -> dict[str, int]:
    """What the process holds now: RSS, live tensor bytes, pinned host bytes, and on CUDA the GPU
    allocator's bytes."""
    gc.collect()
    objects = gc.get_objects()
    # type(), not isinstance: isinstance would touch lazily imported modules' deprecated attributes
    stores = [o for o in objects if issubclass(type(o), HostKVStore) and not o._closed]
    # which live tensors hold pinned memory, if any does: what to look for when the check fails
    pinned = None
    if device.type == "cuda":
        pinned = Counter(f"{tuple(o.shape)} {o.dtype}" for o in objects
                         if type(o) is torch.Tensor and o.device.type == "cpu" and o.is_pinned())
    live_tensor_bytes = tensor_bytes(objects)
    del objects  # RSS is read with the list of every object freed, as at every reading
    state = dict(rss_bytes=psutil.Process().memory_info().rss, tensor_bytes=live_tensor_bytes,
                 open_host_stores=len(stores),
                 registered_pinned_bytes=sum(s.nbytes for s in stores if s.pin_method == "cudaHostRegister"),
                 torch_pinned_bytes=0)
    if device.type == "cuda":
        sync(device)
        # The pinned allocator takes blocks back from finished copies only when it next looks (and
        # blocks a CUDA graph's capture staged stay its until the cache is emptied): empty it, so
        # that what is counted is what live tensors hold. (torch 2.13 names it in torch.accelerator.)
        empty_host_cache = getattr(torch.accelerator, "empty_host_cache", None) or torch._C._host_emptyCache
        empty_host_cache()
        stats = torch.cuda.host_memory_stats()
        state["pinned_tensors"] = dict(pinned.most_common(20))
        # allocated, not active, bytes: with the cache emptied they are the pinned memory torch holds
        # (torch 2.11's active-bytes counter drifts: 8 -> 56 bytes over a soak with 0 bytes allocated)
        state["torch_pinned_bytes"] = int(stats.get("allocated_bytes.current", 0))
        # cuBLAS keeps a workspace per stream it ran on, and each herald lookahead mode takes a side
        # stream from torch's pool: not the engine's memory
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            torch._C._cuda_clearCublasWorkspaces()
        state["gpu_allocated_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.empty_cache()
        state["gpu_reserved_bytes"] = torch.cuda.memory_reserved(device)
    state["pinned_bytes"] = state["registered_pinned_bytes"] + state["torch_pinned_bytes"]
    return state


def python_objects() -> Counter:
    """Live Python objects (those the collector tracks) by type name."""
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects())


def compiled_triton_kernels() -> dict[str, int]:
    """Kernels Triton has compiled in this process, per jitted function (over every device)."""
    # type name, not isinstance: importing triton here would be the soak's only reason to
    functions = [o for o in gc.get_objects() if type(o).__name__ == "JITFunction"]
    counts = {fn.__name__: sum(len(cache[0]) for cache in getattr(fn, "device_caches", {}).values())
              for fn in functions}
    return {name: count for name, count in sorted(counts.items()) if count}


def triton_check(before: dict[str, int], per_call: list[dict[str, int]]) -> dict:
    """Kernels Triton compiled during the soak: the first call may still meet shapes the warm-up did
    not (a last pass of fewer rows, a context length of another divisibility); after it none may
    appear, or kernels grow with the requests."""
    counts = [sum(k.values()) for k in per_call]
    later = counts[-1] - counts[0] if counts else 0
    return dict(ok=later <= 0, before=sum(before.values()), after_first_call=counts[0] if counts else None,
                after=counts[-1] if counts else None, allowed_growth_after_first_call=0,
                grown_after_first_call=sorted(name for name, n in per_call[-1].items() if n > per_call[0].get(name, 0))
                if counts else [])


def second_half_growth(values: list[float]) -> float | None:
    """How much a per-call figure grew over the second half of the calls: warm-up (kernels compiled
    for new shapes, allocator pools) is over by then, a leak still grows. None below 4 calls."""
    if len(values) < 4:
        return None
    return values[-1] - values[len(values) // 2 - 1]


# A leak of this share of a KV page per request passes the memory checks; of a whole page, it fails them.
LEAK_SHARE_OF_PAGE = 0.25
# RSS growth that is no leak, on top of the per-request allowance: code paths and allocator caches
# that the warm-up call did not reach, which do not grow with the requests. Measured on the CPU
# (tiny-random, pages of 4 tokens: 2 KiB; 2026-12-07): +0.0 to +0.7 MiB over 20 requests (each mode,
# several seeds), +0.03 to +1.2 MiB over 300 (dense, mage, quest, herald in one process; 1.3 MiB in
# benchmarks/data/soak_cpu.json), while the live tensor bytes came back exactly every time.
# On CUDA no run has yet told that warm-up apart from growth: Triton kernels and CUDA graphs for
# shapes the warm-up did not run hold host memory, and 16 MiB is an allowance for them to confirm.
# The 2026-12-01 H200 runs (qwen3-1.7b geometry, pages of 1.75 MiB) grew 18 MiB over 24 requests
# (within 16 + 10.5 MiB) and 55 MiB over 36 (beyond 16 + 15.75 MiB: 1.5 MiB a request, about what a
# leak of a page per request grows by), while Triton compiled 2-4 kernels after the baseline.
RSS_WARM_UP_BYTES = {"cpu": 2 * MiB, "cuda": 16 * MiB}


def kv_page_bytes(model: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    """One KV page of `model`: K and V of `page_size` tokens over every layer."""
    return page_size * kv_bytes_per_token(model, dtype)


def memory_allowances(requests: int, page_bytes: int, device: torch.device) -> dict[str, int]:
    """Growth each memory figure may show after a soak of `requests` requests: a quarter of a KV page
    per request (LEAK_SHARE_OF_PAGE) where a leak would show, plus RSS's measured warm-up term; none
    for open host stores and pinned bytes, which come back exactly."""
    per_requests = int(LEAK_SHARE_OF_PAGE * requests * page_bytes)
    return dict(rss_bytes=RSS_WARM_UP_BYTES[device.type] + per_requests, tensor_bytes=per_requests,
                open_host_stores=0, pinned_bytes=0, gpu_allocated_bytes=per_requests, gpu_reserved_bytes=per_requests)


def baseline_checks(before: dict[str, int], after: dict[str, int], allowances: dict[str, int]) -> dict[str, dict]:
    """name -> {ok, before, after, allowed growth} for every memory figure that must come back."""
    return {name: dict(ok=after[name] - before[name] <= allowed, before=before[name], after=after[name],
                       allowed_growth=allowed)
            for name, allowed in allowances.items() if name in before}


# ------------------------------------------------------------------------------------------------
# workload


@dataclass
class Workload:
    """The requests of one mode's soak and when each is cancelled (the how-many-th question about
    it answers yes; 1 = before it starts)."""

    requests: list[GenerationRequest]
    cancel_at: dict[str, int]
    # of those cancelled mid-block: cancelled instead at the first question, from their cancel_at-th
    # on, asked while the mode's side streams (the lookahead's transfers) still run
    in_flight: set[str] = field(default_factory=set)


def make_workload(count: int, seed: int, vocab: int, prompt_range: tuple[int, int], new_range: tuple[int, int],
                  block: int, steps: int, cancel_rate: float, before_start_share: float = 0.3,
                  in_flight_share: float = 0.0) -> Workload:
    rng = random.Random(seed)
    tokens = torch.Generator().manual_seed(seed)  # prompts of 100K tokens: drawn by torch, not one by one
    reqs, cancel_at, in_flight = [], {}, set()
    # ids 0, 1 (tiny-random's EOS and mask) and the last two (the geometries' mask) stay out of prompts;
    # ids below 257 are Python's shared small ints: hundreds of 128K-token prompts then cost a pointer
    # per token, not a 28-byte int object each (GiBs of RSS beside the soak's own)
    high = min(vocab - 2, 257)
    for i in range(count):
        length, new = rng.randint(*prompt_range), rng.randint(*new_range)
        sampled = rng.random() < 0.5
        prompt = torch.randint(2, high, (length,), generator=tokens).tolist()
        req = GenerationRequest(prompt=prompt, max_new_tokens=new,
                                temperature=0.8 if sampled else 0.0, top_p=0.95 if sampled else None,
                                seed=rng.randrange(2**31), stop_at_eos=rng.random() < 0.5, request_id=f"r{i}")
        reqs.append(req)
        if rng.random() < cancel_rate:
            blocks = -(-(length + new) // block) - length // block
            asks = 1 + blocks * (steps + 2)  # at admission, then before every pass of every block
            cancel_at[req.request_id] = 1 if rng.random() < before_start_share else rng.randint(2, asks)
            if in_flight_share > 0 and cancel_at[req.request_id] > 1 and rng.random() < in_flight_share:
                in_flight.add(req.request_id)
    return Workload(reqs, cancel_at, in_flight)


@dataclass
class FaultInjector:
    """Makes passes of the modes it is installed on fail at random (see the module docstring)."""

    rate: float
    rng: random.Random
    transfer_rate: float = 0.0
    injected: list[dict] = field(default_factory=list)

    def arm_transfer_fault(self, mode: AttentionMode, batch: ForwardBatch) -> None:
        """Set the host store's fault hook for this pass: the first transfer of the pass's kind (a
        write for prefill and commit, a gather for step 0 and the lookahead) that carries pages of
        one of its rows fails for those pages (TransferFault), so that row's request alone fails."""
        store = mode.store
        op = "write" if batch.phase in (Phase.PREFILL, Phase.COMMIT) else "gather"
        if batch.phase is Phase.DENOISE and batch.step > 0:
            return  # later steps move no page
        victim = self.rng.choice(batch.seq_ids)
        where = f"{batch.phase.value} pass, step {batch.step}"

        def hook(kind: str, layer, pages: torch.Tensor) -> None:
            if kind != op or mode.batch is not batch or not store.has(victim):
                return
            mine = set(pages.tolist()) & set(store.page_table(victim).tolist())
            if mine:
                store.fault_hook = None  # one fault per arming
                self.injected.append(dict(where=where, rows=[victim], transfer=op))
                raise TransferFault(mine, f"injected {op} fault in the {where}")

        store.fault_hook = hook

    def install(self, mode: AttentionMode, num_layers: int) -> None:
        plan, run = mode.plan, mode.run
        armed: list[tuple[int, Exception]] = []  # (layer, error) for the planned pass
        store = getattr(mode, "store", None)  # herald's host store: where transfer faults go

        def error_for(batch: ForwardBatch) -> Exception:
            where = f"{batch.phase.value} pass, step {batch.step}"
            if self.rng.random() < 0.5:
                victim = self.rng.choice(batch.seq_ids)
                self.injected.append(dict(where=where, rows=[victim]))
                return RequestError([victim], f"injected fault in the {where}")
            self.injected.append(dict(where=where, rows=list(batch.seq_ids)))
            return RuntimeError(f"injected fault in the {where}")

        def plan_(batch: ForwardBatch) -> None:
            armed.clear()
            if store is not None:
                store.fault_hook = None  # a hook armed for the last pass that never fired: graphs replay again
                if self.rng.random() < self.transfer_rate:
                    self.arm_transfer_fault(mode, batch)
            if self.rng.random() < self.rate:
                if self.rng.random() < 0.5:
                    raise error_for(batch)
                armed.append((self.rng.randrange(num_layers), error_for(batch)))
            plan(batch)

        def run_(layer: int, q, k, v):
            if armed and armed[0][0] == layer:
                raise armed.pop()[1]
            return run(layer, q, k, v)

        mode.plan, mode.run = plan_, run_


class RandomContextLoop(BlockDiffusionLoop):
    """The engine's loop with each prompt's whole blocks loaded as random KV instead of prefilled
    (`AttentionMode.load_random_context`, as benchmarks.throughput does): the KV goes where a
    prefill would put it, the prompt's tail shares the first block as usual."""

    def _prefill(self, seq) -> None:
        if self.settings.token_shift:
            raise ValueError("--random-context has no first-block token for a token-shift rule (fast_dllm_v2)")
        if seq.prefix_len:
            self.mode.load_random_context(seq.seq_id, seq.prefix_len, seed=seq.seq_id)
        seq.tokens = list(seq.prompt_ids)


class SoakEngine(Engine):
    """An Engine whose modes get the fault injector (when there is one), whose last mode is at hand
    (`current_mode`: its side streams tell whether transfers are in flight), and whose loop loads
    random context instead of prefilling when `random_context` is set."""

    injector: FaultInjector | None = None
    random_context: bool = False
    current_mode: AttentionMode | None = None

    def make_mode(self, num_sequences: int, max_tokens: int) -> AttentionMode:
        mode = super().make_mode(num_sequences, max_tokens)
        if self.injector is not None:
            self.injector.install(mode, self.model_config.num_layers)
        self.current_mode = mode
        return mode

    def make_loop(self, mode: AttentionMode, max_batch_size: int) -> BlockDiffusionLoop:
        loop = super().make_loop(mode, max_batch_size)
        if self.random_context:
            loop.__class__ = RandomContextLoop  # the same loop, its prefill replaced
        return loop

    def transfers_in_flight(self) -> bool:
        """The current mode's side streams (herald's lookahead and its gathers) have work queued."""
        side = getattr(self.current_mode, "_side_streams", None)
        return side is not None and any(not stream.query() for stream in side())


# ------------------------------------------------------------------------------------------------
# one mode


def soak_mode(engine: SoakEngine, workload: Workload, calls: int, fault_rate: float, seed: int, label: str,
              seconds: float | None = None, transfer_fault_rate: float = 0.0, progress_every: float = 15.0) -> dict:
    """Soak one mode (see the module docstring). seconds: once this long has passed since the
    baseline, every request still running or waiting is cancelled at its next question and no
    further call starts; progress_every: seconds between progress lines within a call."""
    device = engine.device
    page_bytes = kv_page_bytes(engine.model_config, engine.config.sparse.page_size, engine.dtype)
    # a full batch: kernels compile for the shapes the soak runs (Triton and CUDA-graph memory is
    # not a leak)
    warm = [replace(r, request_id=f"warm{i}")
            for i, r in enumerate(workload.requests[:engine.config.max_batch_size])]
    engine.generate(warm)
    engine.current_mode = None  # the warm-up's (closed) mode: not part of the baseline
    before = memory_state(device)
    kernels_before = compiled_triton_kernels()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    injector = engine.injector = (FaultInjector(fault_rate, random.Random(seed + 1), transfer_fault_rate)
                                  if fault_rate > 0 or transfer_fault_rate > 0 else None)
    asked: dict[str, int] = {}
    cancelled_when: dict[str, int] = {}
    in_flight_cancels: list[str] = []  # answered yes while the mode's side streams still ran
    at_deadline: list[str] = []
    peak_rss = before["rss_bytes"]
    process = psutil.Process()
    t0 = time.perf_counter()
    deadline = None if seconds is None else t0 + seconds
    last_report = t0

    def report() -> None:
        gpu = (f", GPU {torch.cuda.memory_allocated(device) / MiB:.0f} MiB allocated" if device.type == "cuda" else "")
        print(f"  [{label}] {time.perf_counter() - t0:.0f} s: {len(asked)} requests asked about, "
              f"{len(cancelled_when)} cancelled ({len(in_flight_cancels)} with transfers in flight), "
              f"{len(injector.injected) if injector else 0} faults injected; RSS "
              f"{process.memory_info().rss / MiB:.0f} MiB{gpu}", flush=True)

    def should_cancel(request_id: str) -> bool:
        nonlocal peak_rss, last_report
        now = time.perf_counter()
        peak_rss = max(peak_rss, process.memory_info().rss)
        if now - last_report >= progress_every:
            last_report = now
            report()
        n = asked[request_id] = asked.get(request_id, 0) + 1
        if deadline is not None and now > deadline:
            at_deadline.append(request_id)
        elif request_id in workload.in_flight:
            if n < workload.cancel_at[request_id] or not engine.transfers_in_flight():
                return False
            in_flight_cancels.append(request_id)
        elif n != workload.cancel_at.get(request_id):
            return False
        cancelled_when[request_id] = n
        return True

    reqs = workload.requests
    size = -(-len(reqs) // calls)
    chunks = [reqs[start:start + size] for start in range(0, len(reqs), size)]
    results: list[GenerationResult] = []
    per_call, leftovers, problems = [], [], []
    last_objects = python_objects()
    not_run = 0
    for c, chunk in enumerate(chunks):
        if deadline is not None and time.perf_counter() > deadline:
            not_run += len(chunk)  # not started: each call builds a mode (a host store of its batch) first
            continue
        t_call = time.perf_counter()
        got = engine.generate(chunk, should_cancel=should_cancel)
        stats = engine.last_stats
        if [r.request_id for r in got] != [r.request_id for r in chunk]:
            problems.append(f"call {c}: results are not the requests in prompt order")
        occupied = {k: v for k, v in engine.last_occupancy.items() if v}
        if occupied:
            leftovers.append(dict(call=c, occupancy=occupied))
        results += got
        # Python objects by type and compiled Triton kernels after each call: a leak of Python state
        # grows the first call after call; kernels compiled for shapes not seen before, the second
        objects = python_objects()
        entry = dict(call=c, requests=len(chunk), cancelled=stats.cancelled, errors=stats.errors,
                     tokens=stats.generated_tokens, wall_s=time.perf_counter() - t_call,
                     rss_mib=process.memory_info().rss / MiB, python_objects=sum(objects.values()),
                     python_object_growth=dict((objects - last_objects).most_common(8)),
                     triton_kernels=compiled_triton_kernels(), occupancy=dict(engine.last_occupancy))
        last_objects = objects
        per_call.append(entry)
        print(f"  [{label}] call {c + 1}/{len(chunks)}: {len(chunk)} requests, {stats.cancelled} cancelled, "
              f"{stats.errors} errors, {stats.generated_tokens} tokens in {entry['wall_s']:.1f} s; "
              f"RSS {entry['rss_mib']:.0f} MiB, {entry['python_objects']} python objects, "
              f"{sum(entry['triton_kernels'].values())} Triton kernels; "
              f"mode left {occupied or 'nothing'}", flush=True)
    wall = time.perf_counter() - t0
    engine.injector = engine.current_mode = None
    after = memory_state(device)
    kernels_after = compiled_triton_kernels()
    peak_rss = max(peak_rss, after["rss_bytes"])

    reasons = [r.finish_reason for r in results]
    counts = {reason: reasons.count(reason) for reason in ("length", "eos", "cancelled", "error")}
    unexpected = [r for r in results if r.finish_reason not in counts]
    real_errors = [dict(request_id=r.request_id, error=r.error) for r in results
                   if r.finish_reason == "error" and "injected" not in (r.error or "")]
    before_start = sum(1 for rid, when in cancelled_when.items() if when == 1)
    ran = len(reqs) - not_run
    checks = baseline_checks(before, after, memory_allowances(ran, page_bytes, device))
    checks["mode_empty_after_every_call"] = dict(ok=not leftovers, leftovers=leftovers)
    checks["triton_kernels_settled"] = triton_check(kernels_before, [e["triton_kernels"] for e in per_call])
    checks["every_request_answered"] = dict(
        ok=not problems and not unexpected and len(results) == ran and sum(counts.values()) == ran,
        problems=problems + [f"{r.request_id}: finish_reason {r.finish_reason!r}" for r in unexpected])
    checks["cancellations_counted"] = dict(ok=counts["cancelled"] == len(cancelled_when),
                                           cancelled=counts["cancelled"], answered_yes=len(cancelled_when))
    checks["no_error_but_injected_ones"] = dict(ok=not real_errors, errors=real_errors[:10])
    transfer_faults = sum(1 for f in injector.injected if "transfer" in f) if injector else 0
    row = dict(label=label, mode=engine.config.mode, requests=ran, requests_not_run=not_run, calls=len(per_call),
               **counts, cancelled_before_start=before_start, cancelled_running=counts["cancelled"] - before_start,
               cancelled_in_flight=len(in_flight_cancels), cancelled_at_deadline=len(set(at_deadline)),
               seconds=seconds, deadline_reached=deadline is not None and bool(at_deadline or not_run),
               faults_injected=len(injector.injected) if injector else 0, transfer_faults_injected=transfer_faults,
               triton_kernels_before=sum(kernels_before.values()), triton_kernels_after=sum(kernels_after.values()),
               tokens=sum(len(r.tokens) for r in results),
               wall_s=wall, tokens_per_s=sum(len(r.tokens) for r in results) / wall if wall > 0 else 0.0,
               kv_page_bytes=page_bytes, memory_before=before, memory_after=after, peak_rss_bytes=peak_rss,
               gpu_peak_allocated_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
               checks=checks, restored=all(c["ok"] for c in checks.values()), per_call=per_call,
               rss_growth_second_half_mib=second_half_growth([e["rss_mib"] for e in per_call]))
    return row


# ------------------------------------------------------------------------------------------------
# output


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"\nsoak: {meta['model']}, {meta['device']}, batch {meta['batch']}, {meta['calls']} calls, "
          f"cancel rate {meta['cancel_rate']}, fault rate {meta['fault_rate']}")
    head = (f"{'mode':>18} {'reqs':>5} {'len':>4} {'eos':>4} {'canc':>9} {'err':>4} {'tokens':>7} {'tok/s':>7} "
            f"{'RSS MiB before/after/peak':>26} {'pinned MiB':>12} {'GPU alloc MiB':>15} {'restored':>8}")
    print(head)
    for r in rows:
        b, a = r["memory_before"], r["memory_after"]
        rss = f"{b['rss_bytes'] / MiB:.0f}/{a['rss_bytes'] / MiB:.0f}/{r['peak_rss_bytes'] / MiB:.0f}"
        pinned = f"{b['pinned_bytes'] / MiB:.0f}/{a['pinned_bytes'] / MiB:.0f}"
        gpu = (f"{b['gpu_allocated_bytes'] / MiB:.0f}/{a['gpu_allocated_bytes'] / MiB:.0f}"
               if "gpu_allocated_bytes" in b else "-")
        cancelled = f"{r['cancelled_before_start']}+{r['cancelled_running']}"
        print(f"{r['label']:>18} {r['requests']:>5} {r['length']:>4} {r['eos']:>4} {cancelled:>9} {r['error']:>4} "
              f"{r['tokens']:>7} {r['tokens_per_s']:>7.1f} {rss:>26} {pinned:>12} {gpu:>15} "
              f"{'yes' if r['restored'] else 'NO':>8}")
        allowed = {name: check["allowed_growth"] for name, check in r["checks"].items() if "allowed_growth" in check}
        gpu = f", GPU {allowed['gpu_allocated_bytes'] / MiB:.2f} MiB" if "gpu_allocated_bytes" in allowed else ""
        print(f"{'':>18} allowed growth (a leak of {LEAK_SHARE_OF_PAGE:g} of a {r['kv_page_bytes'] / 1024:g} KiB KV "
              f"page per request): RSS {allowed['rss_bytes'] / MiB:.2f} MiB, "
              f"tensors {allowed['tensor_bytes'] / MiB:.2f} MiB{gpu}")
        deadline = (f"; --seconds {r['seconds']:g} reached: {r['cancelled_at_deadline']} cancelled there, "
                    f"{r['requests_not_run']} not started" if r.get("deadline_reached") else "")
        print(f"{'':>18} {r['faults_injected']} faults injected ({r['transfer_faults_injected']} transfers), "
              f"{r['cancelled_in_flight']} cancelled with transfers in flight; Triton kernels "
              f"{r['triton_kernels_before']} -> {r['triton_kernels_after']}{deadline}")
        if r.get("rss_growth_second_half_mib") is not None:
            print(f"{'':>18} RSS grew {r['rss_growth_second_half_mib']:+.0f} MiB over the second half of the calls")
        for name, check in r["checks"].items():
            if not check["ok"]:
                print(f"{'':>18} FAILED {name}: {json.dumps({k: v for k, v in check.items() if k != 'ok'})[:300]}")
    print("canc: cancelled before start + while running; pinned: HostKVStores still open + torch's pinned "
          "allocator in use")


# ------------------------------------------------------------------------------------------------


def mode_configs(names: list[str], source: str) -> list[tuple[str, str, dict]]:
    """(label, mode, overrides) per name: a mode, or a label of benchmarks.throughput's table."""
    known = {label: (label, mode, over) for label, mode, over in variants(list(SELECTION_SOURCES[1:]))}
    out = []
    for name in names:
        if name == "herald":
            out.append((f"herald-{source}", "herald", {"source": source}))
        elif name in known:
            out.append(known[name])
        else:
            raise SystemExit(f"--modes {name!r}: choose among herald, {', '.join(sorted(known))}")
    return out


def save(rows: list[dict], meta: dict, out: str | None) -> list[Path]:
    """Write the runs so far: all in `out`, or one file per mode under benchmarks/data."""
    if out:
        outputs = {Path(out): rows}
    else:
        modes = [r["mode"] for r in rows]
        outputs = {DATA / f"soak_{r['mode'] if modes.count(r['mode']) == 1 else r['label']}.json": [r] for r in rows}
    for path, part in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(meta=meta, runs=part), indent=1, default=str))
    return list(outputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["herald"],
                        help="dense, mage, quest, herald (with --source) or a label of benchmarks.throughput "
                             "(herald-cpu, dense-sdpa, ...)")
    parser.add_argument("--mode", dest="modes", nargs="+", help="same as --modes")
    parser.add_argument("--source", default="gpu-compact", choices=SELECTION_SOURCES[1:], help="herald's selection")
    parser.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None,
                        help="herald: the lookahead on or off (default: the runtime's, on with CUDA)")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: checkpoints/tiny-random)")
    parser.add_argument("--geometry", default=None, choices=sorted(GEOMETRIES),
                        help="random weights at this geometry instead of a checkpoint (GPU runs)")
    parser.add_argument("--context", type=int, default=8192, help="--geometry: the longest prompt")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--calls", type=int, default=3, help="Engine.generate calls the requests are split over")
    parser.add_argument("--batch", type=int, default=4, help="max_batch_size")
    parser.add_argument("--min-prompt", type=int, default=None)
    parser.add_argument("--max-prompt", type=int, default=None)
    parser.add_argument("--max-new", type=int, default=None, help="max_new_tokens are drawn from 1..this")
    parser.add_argument("--cancel-rate", type=float, default=0.25)
    parser.add_argument("--fault-rate", type=float, default=0.0, help="probability that a pass fails")
    parser.add_argument("--transfer-fault-rate", type=float, default=0.0,
                        help="herald: probability that a pass's host-store transfer fails for one row's pages "
                             "(that pass runs eagerly)")
    parser.add_argument("--in-flight-share", type=float, default=0.5,
                        help="share of the mid-block cancellations answered while the lookahead's transfers run")
    parser.add_argument("--seconds", type=float, default=None,
                        help="bound on each mode's soak after its warm-up: then every request still running or "
                             "waiting is cancelled and no further call starts")
    parser.add_argument("--random-context", action="store_true",
                        help="load each prompt's KV as random values instead of prefilling it (long contexts)")
    parser.add_argument("--progress-every", type=float, default=15.0, help="seconds between progress lines")
    parser.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's, 32 for --geometry")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps per block (default: 8 for --geometry, else the block size)")
    parser.add_argument("--budget", type=float, default=None, help="sparse budget fraction")
    parser.add_argument("--page-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help=f"JSON file (default: {DATA}/soak_<mode>.json, one per mode)")
    parser.add_argument("--quiet", action="store_true", help="no per-block progress bars")
    args = parser.parse_args(argv)
    for name in ("requests", "calls", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    rates = ("cancel_rate", "fault_rate", "transfer_fault_rate", "in_flight_share")
    if not all(0 <= getattr(args, name) <= 1 for name in rates):
        parser.error(f"{', '.join('--' + n.replace('_', '-') for n in rates)} are probabilities: give them in [0, 1]")
    if args.seconds is not None and args.seconds <= 0:
        parser.error(f"--seconds {args.seconds:g}: give a positive bound")
    if args.geometry and args.model:
        parser.error("give --model or --geometry, not both")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU; use --device cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    real_geometry = args.geometry is not None

    block = args.block_size or (32 if real_geometry else None)
    if real_geometry:
        lo, hi = args.min_prompt or args.context // 4, args.max_prompt or args.context
        new_max = args.max_new or 4 * block
        model_config = geometry(args.geometry, hi + new_max + block)
        print(f"building {args.geometry} with random weights on {device} ({dtype})", flush=True)
        model = random_model(model_config, dtype=dtype, device=device)
        model_name = f"<random {args.geometry}>"
        mask = model_config.vocab_size - 1
        sparse = SparseConfig(budget_fraction=args.budget or 0.05, page_size=args.page_size or 16,
                              lookahead=args.lookahead)
    else:
        path = Path(args.model) if args.model else CHECKPOINTS / "tiny-random"
        model, model_config = load_model(path, dtype=dtype, device=device)
        model_name, mask = str(path), None
        lo, hi = args.min_prompt or 4, args.max_prompt or 200
        new_max = args.max_new or 24
        # small contexts: small pages, sinks and window, so the selection is a real subset
        sparse = SparseConfig(budget_fraction=args.budget or 0.3, page_size=args.page_size or 4, sink_tokens=4,
                              local_window=8, dense_layers=1, compact_group=16, lookahead=args.lookahead)
    if not 1 <= lo <= hi:
        parser.error(f"prompt lengths {lo}..{hi}: need 1 <= --min-prompt <= --max-prompt")
    base = EngineConfig(model_path=model_name, device=args.device, dtype=str(dtype).removeprefix("torch."),
                        block_size=block, denoising_steps=args.steps or (8 if real_geometry else None),
                        unmasking="fixed" if real_geometry else "threshold",
                        mask_token_id=mask, max_batch_size=args.batch, progress=not args.quiet, sparse=sparse)
    configs = mode_configs(args.modes, args.source)
    meta = dict(model=model_name, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, batch=args.batch, calls=args.calls, requests=args.requests,
                prompt_range=[lo, hi], max_new=new_max, cancel_rate=args.cancel_rate, fault_rate=args.fault_rate,
                seed=args.seed, sparse=dict(vars(sparse)), leak_share_of_page=LEAK_SHARE_OF_PAGE,
                transfer_fault_rate=args.transfer_fault_rate, in_flight_share=args.in_flight_share,
                seconds=args.seconds, random_context=args.random_context,
                rss_warm_up_bytes=RSS_WARM_UP_BYTES[device.type], date=time.strftime("%Y-%m-%d"))
    rows, written = [], []
    for label, mode, overrides in configs:
        sparse_over = {k: v for k, v in overrides.items() if k in SparseConfig.__dataclass_fields__}
        engine_over = {k: v for k, v in overrides.items() if k not in sparse_over}
        config = replace(base, mode=mode, sparse=replace(sparse, **sparse_over), **engine_over)
        engine = SoakEngine(config, model=model)
        engine.random_context = args.random_context
        settings = engine.settings
        workload = make_workload(args.requests, args.seed, model_config.vocab_size, (lo, hi), (1, new_max),
                                 settings.block_size, settings.steps, args.cancel_rate,
                                 in_flight_share=args.in_flight_share)
        print(f"[{label}] {args.requests} requests (prompts {lo}..{hi} tokens, 1..{new_max} new), "
              f"{len(workload.cancel_at)} to cancel ({len(workload.in_flight)} with transfers in flight), "
              f"fault rate {args.fault_rate}, transfer fault rate {args.transfer_fault_rate}"
              f"{f', at most {args.seconds:g} s' if args.seconds else ''}", flush=True)
        rows.append(soak_mode(engine, workload, args.calls, args.fault_rate, args.seed, label, seconds=args.seconds,
                              transfer_fault_rate=args.transfer_fault_rate, progress_every=args.progress_every))
        del engine
        written = save(rows, meta, args.out)  # after every mode: a run cut short keeps what it measured
    print_table(rows, meta)
    for path in written:
        print(f"wrote {path}")
    failed = [r["label"] for r in rows if not r["restored"]]
    if failed:
        print(f"NOT back at the baseline: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
