"""Faults stay with the requests they touch (checkpoints/tiny-random on the CPU, every mode).

A fault is injected by wrapping the attention mode the engine builds: it raises in the last layer
of the n-th pass of a chosen phase (and step) that holds a chosen request, so the layers before it
have done their work (a commit has half written its K/V). A plain exception fails every request of
that pass; a `RequestError` naming one request fails only it, and the pass's other rows run their
block again. Either way the failed requests end with "error" and the message, keep the tokens they
had committed, every other request gets exactly the tokens of a fault-free run (greedy and seeded
sampling alike), and afterwards every slot, host page, row and cache partition is free.
"""
import random
import re
from dataclasses import dataclass

import pytest
import torch

from offload.host_store import TransferFault
from runtime import Engine, EngineConfig, RequestError
from runtime.attention import AttentionMode, ForwardBatch, Phase
from runtime.checkpoint import load_model
from runtime.config import SparseConfig
from runtime.decoding import GenerationRequest
from runtime.engine import CHECKPOINTS
from tests.runtime.kv_checks import still_held

MODES = [("dense", {}), ("mage", {}), ("quest", {}), ("herald", {"source": "cpu"}),
         ("herald", {"source": "gpu-compact"}), ("herald", {"source": "gpu-compact", "lookahead": True})]
MODE_IDS = [m + (f"-{e['source']}" if e else "") + ("-lookahead" if e.get("lookahead") else "") for m, e in MODES]
TARGET = "r1"  # the request the faults aim at: sampled, in the first batch, 41-token prompt (3 prefill chunks)


@pytest.fixture(scope="module")
def model():
    model, _ = load_model(CHECKPOINTS / "tiny-random", dtype=torch.float32)
    return model


def requests(count=10, seed=3) -> list[GenerationRequest]:
    """Even requests greedy, odd ones sampled from their own seed; random lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        length = 41 if f"r{i}" == TARGET else rng.randint(5, 60)
        sampling = dict(temperature=0.9, top_p=0.95, seed=100 + i) if i % 2 else {}
        out.append(GenerationRequest(prompt=[rng.randrange(2, 101) for _ in range(length)],
                                     max_new_tokens=rng.randint(6, 18), stop_at_eos=False, request_id=f"r{i}",
                                     **sampling))
    return out


def make_engine(model, mode: str, extra: dict) -> Engine:
    sparse = SparseConfig(budget_fraction=0.3, page_size=4, sink_tokens=4, local_window=8, dense_layers=1,
                          compact_group=16, check_residency=True, **extra)
    # fixed schedule, 4 steps: every full block runs steps 0..3, so a fault can aim at step 2
    config = EngineConfig(model_path=str(CHECKPOINTS / "tiny-random"), mode=mode, device="cpu", dtype="float32",
                          progress=False, unmasking="fixed", denoising_steps=4, max_batch_size=4,
                          prefill_chunk_size=16, sparse=sparse)
    return Engine(config, model=model)


@dataclass
class Fault:
    """Raise in the last layer of the `occurrence`-th pass of `phase` (and `step`) holding `target`.

    kind: "runtime" (a RuntimeError: the whole pass fails), "oom" / "host-oom" (what torch raises
    when GPU / host memory runs out: the whole pass fails), "request" (RequestError naming the
    target), "stray" (RequestError naming a sequence no pass holds), "interrupt"
    (KeyboardInterrupt), "assertion" (AssertionError: a broken invariant), "transfer" (herald: the
    cache assigns slots to the misses, then a RequestError naming the target before their gather
    ran).
    """

    phase: Phase
    step: int | None
    occurrence: int
    kind: str
    target: str = TARGET
    fired: tuple[str, ...] = ()  # request ids of the pass that raised

    def install(self, mode: AttentionMode, request_of: dict[int, str], num_layers: int) -> None:
        seen = 0
        armed: list[ForwardBatch] = []
        plan, run = mode.plan, mode.run

        def matches(batch: ForwardBatch) -> bool:
            return (not self.fired and batch.phase is self.phase and (self.step is None or batch.step == self.step)
                    and self.target in [request_of[s] for s in batch.seq_ids])

        def plan_(batch: ForwardBatch) -> None:
            nonlocal seen
            armed.clear()
            if matches(batch):
                seen += 1
                if seen == self.occurrence:
                    armed.append(batch)
            plan(batch)

        def fire() -> None:
            batch = armed.pop()
            self.fired = tuple(request_of[s] for s in batch.seq_ids)
            where = f"{batch.phase.value} pass, step {batch.step}"
            if self.kind == "interrupt":
                raise KeyboardInterrupt
            if self.kind == "assertion":
                raise AssertionError(f"injected broken invariant in the {where}")
            target = [s for s in batch.seq_ids if request_of[s] == self.target]
            if self.kind == "stray":
                raise RequestError([-1], f"injected fault naming no row of the {where}")
            if self.kind in ("request", "transfer"):
                raise RequestError(target, f"injected {self.kind} fault in the {where}")
            if self.kind == "oom":  # what the CUDA caching allocator raises
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected in the {where})")
            if self.kind == "host-oom":  # what torch's CPU allocator raises
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                                   f"memory: you tried to allocate 2147483648 bytes (injected in the {where})")
            raise RuntimeError(f"injected fault in the {where}")

        def run_(layer, q, k, v):
            if armed and layer == num_layers - 1 and self.kind != "transfer":
                fire()
            return run(layer, q, k, v)

        mode.plan, mode.run = plan_, run_
        if self.kind == "transfer":
            assign = mode.fetcher.directory.assign

            def assign_(*args, **kwargs):
                out = assign(*args, **kwargs)  # the misses now own slots ...
                if armed:
                    fire()  # ... that their gather never fills
                return out

            mode.fetcher.directory.assign = assign_


class Run:
    """Engine.generate with `fault` (a Fault or a TransferHook) injected into the mode it builds;
    what the mode still held when generate closed it lands in `leftover`."""

    def __init__(self, engine: Engine, fault: "Fault | TransferHook | None" = None):
        self.engine, self.fault = engine, fault
        self.leftover: list[str] | None = None
        request_of: dict[int, str] = {}
        make_sequence, make_mode = engine.make_sequence, engine.make_mode

        def make_sequence_(request):
            seq = make_sequence(request)
            request_of[seq.seq_id] = request.request_id
            return seq

        def make_mode_(num_sequences, max_tokens):
            mode = make_mode(num_sequences, max_tokens)
            if fault is not None:
                fault.install(mode, request_of, engine.model_config.num_layers)
            close = mode.close

            def close_():
                self.leftover = still_held(mode, num_sequences)
                close()

            mode.close = close_
            return mode

        engine.make_sequence, engine.make_mode = make_sequence_, make_mode_

    def generate(self, reqs, **kwargs):
        return self.engine.generate(reqs, **kwargs)


_baselines: dict[str, dict[str, list[int]]] = {}


def baseline(model, mode, extra) -> dict[str, list[int]]:
    """Tokens of a fault-free run, per request id (once per mode)."""
    key = f"{mode}{extra}"
    if key not in _baselines:
        run = Run(make_engine(model, mode, extra))
        results = run.generate(requests())
        assert all(r.finish_reason == "length" and r.error is None for r in results)
        assert run.leftover == []
        _baselines[key] = {r.request_id: r.tokens for r in results}
    return _baselines[key]


FAULTS = {
    "prefill": Fault(Phase.PREFILL, None, 2, "runtime"),  # the target's second prompt chunk
    "step0-pass": Fault(Phase.DENOISE, 0, 2, "runtime"),
    "step0-request": Fault(Phase.DENOISE, 0, 2, "request"),
    "later-step-pass": Fault(Phase.DENOISE, 2, 1, "runtime"),
    "later-step-request": Fault(Phase.DENOISE, 2, 2, "request"),
    "commit-pass": Fault(Phase.COMMIT, None, 2, "runtime"),
    "commit-request": Fault(Phase.COMMIT, None, 1, "request"),
}


def check_isolated(results, reqs, fault: Fault, want: dict[str, list[int]], engine: Engine) -> None:
    assert [r.request_id for r in results] == [r.request_id for r in reqs]  # every request, prompt order
    assert fault.fired, "the fault never fired: no pass matched it"
    failed = {fault.target} if fault.kind in ("request", "transfer") else set(fault.fired)
    assert fault.phase is Phase.PREFILL or len(fault.fired) > 1, "aim the fault at a pass of several rows"
    for r in results:
        if r.request_id in failed:
            assert r.finish_reason == "error" and "injected" in r.error, (r.request_id, r.finish_reason, r.error)
            assert r.tokens == want[r.request_id][: len(r.tokens)]  # what it had committed, nothing invented
        else:
            assert r.error is None and r.finish_reason == "length"
            assert r.tokens == want[r.request_id], f"{r.request_id} differs from the fault-free run"
    assert engine.last_stats.requests == len(reqs) and engine.last_stats.errors == len(failed)
    assert engine.last_stats.cancelled == 0
    assert engine.last_occupancy and not any(engine.last_occupancy.values())


@pytest.mark.parametrize("fault_name", list(FAULTS))
@pytest.mark.parametrize("mode,extra", MODES, ids=MODE_IDS)
def test_fault_fails_only_the_requests_it_touched(model, mode, extra, fault_name):
    want = baseline(model, mode, extra)
    spec = FAULTS[fault_name]
    fault = Fault(spec.phase, spec.step, spec.occurrence, spec.kind)
    engine = make_engine(model, mode, extra)
    run = Run(engine, fault)
    reqs = requests()
    results = run.generate(reqs)
    check_isolated(results, reqs, fault, want, engine)
    assert run.leftover == []
    if fault.kind == "request":  # rows that ran their block again: greedy and sampled ones among them
        redone = [r for r in reqs if r.request_id in fault.fired and r.request_id != fault.target]
        assert {r.temperature > 0 for r in redone} == {True, False}, fault.fired


@pytest.mark.parametrize("source", ["cpu", "gpu-compact"])
def test_herald_transfer_fault_leaves_no_unfilled_slot(model, source):
    """The cache gave the misses of a step 0 slots, then their transfer failed for one request:
    the others run the block again and must not read those slots as if they held the pages."""
    extra = {"source": source}
    want = baseline(model, "herald", extra)
    fault = Fault(Phase.DENOISE, 0, 3, "transfer")
    engine = make_engine(model, "herald", extra)
    run = Run(engine, fault)
    reqs = requests()
    check_isolated(run.generate(reqs), reqs, fault, want, engine)
    assert run.leftover == []


def test_herald_rerun_after_a_fault_takes_the_lookaheads_selection_again(model):
    """With the lookahead a block takes its pages from the last block's draft, and its own
    lookahead then overwrites that selection. Rows that rerun the block after another row's fault
    must take the very same selection again (so their tokens are a fault-free run's), not a scan."""
    extra = {"source": "gpu-compact", "lookahead": True}
    engine = make_engine(model, "herald", extra)
    fault = Fault(Phase.DENOISE, 2, 2, "request")
    run = Run(engine, fault)
    restored = []
    make_mode = engine.make_mode  # Run's: installs the fault

    def make_mode_(num_sequences, max_tokens):
        mode = make_mode(num_sequences, max_tokens)
        plan, restart_block = mode.plan, mode.restart_block
        taken = {}

        def plan_(batch):
            plan(batch)
            nexts = mode.next_selections
            if batch.phase is Phase.DENOISE and batch.step == 0 and nexts._consumed is not None:
                looked, width, n = nexts._consumed
                taken["selection"] = (looked, width, nexts._store[n].clone())

        def restart_block_(seq_ids):
            restart_block(seq_ids)
            looked, width, store = taken["selection"]
            nexts = mode.next_selections
            assert nexts._rows == looked and nexts._width == width
            assert torch.equal(nexts._store[len(looked)], store)
            restored.append(seq_ids)

        mode.plan, mode.restart_block = plan_, restart_block_
        return mode

    engine.make_mode = make_mode_
    reqs = requests()
    check_isolated(run.generate(reqs), reqs, fault, baseline(model, "herald", extra), engine)
    assert restored and run.leftover == []


def test_request_error_naming_no_row_of_the_pass_fails_the_whole_pass(model):
    want = baseline(model, "dense", {})
    fault = Fault(Phase.DENOISE, 1, 1, "stray")
    engine = make_engine(model, "dense", {})
    run = Run(engine, fault)
    reqs = requests()
    check_isolated(run.generate(reqs), reqs, fault, want, engine)
    assert run.leftover == []


@pytest.mark.parametrize("mode,extra", MODES, ids=MODE_IDS)
def test_keyboard_interrupt_returns_every_result_and_releases_everything(model, mode, extra):
    """An interrupt ends the call (issue 34): the unfinished requests come back "cancelled" with
    what they committed, and nothing stays allocated."""
    engine = make_engine(model, mode, extra)
    run = Run(engine, Fault(Phase.DENOISE, 2, 1, "interrupt"))
    results = run.generate(requests())
    assert results.stats.interrupted and len(results) == len(requests())
    assert all(r.finish_reason == "cancelled" and "KeyboardInterrupt" in r.error for r in results)
    assert run.leftover == []


@pytest.mark.parametrize("mode,extra", [MODES[0], MODES[3]], ids=[MODE_IDS[0], MODE_IDS[3]])
def test_a_broken_invariant_propagates_and_releases_everything(model, mode, extra):
    """An AssertionError (what check_residency raises) says the mode's state cannot be trusted:
    it is not turned into request errors."""
    run = Run(make_engine(model, mode, extra), Fault(Phase.COMMIT, None, 1, "assertion"))
    with pytest.raises(AssertionError, match="injected broken invariant"):
        run.generate(requests())
    assert run.leftover == []


def test_a_failing_should_cancel_propagates(model):
    """A broken callback is the caller's bug, not a fault of the requests."""
    engine = make_engine(model, "herald", {"source": "cpu"})
    run = Run(engine)
    asked = []

    def should_cancel(request_id: str) -> bool:
        asked.append(request_id)
        if len(asked) == 9:  # mid-block
            raise ValueError("callback bug")
        return False

    with pytest.raises(ValueError, match="callback bug"):
        run.generate(requests(), should_cancel=should_cancel)
    assert run.leftover == []


def test_faults_and_cancellations_together(model):
    """A cancelled request and a failed one in the same run: the counts add up and the rest is exact."""
    want = baseline(model, "quest", {})
    fault = Fault(Phase.DENOISE, 1, 2, "request")
    engine = make_engine(model, "quest", {})
    run = Run(engine, fault)
    asked: dict[str, int] = {}

    def should_cancel(request_id: str) -> bool:
        asked[request_id] = asked.get(request_id, 0) + 1
        return (request_id, asked[request_id]) in (("r4", 1), ("r2", 7))  # before start; mid-block

    results = run.generate(requests(), should_cancel=should_cancel)
    reasons = {r.request_id: r.finish_reason for r in results}
    assert reasons["r4"] == reasons["r2"] == "cancelled" and reasons[TARGET] == "error"
    assert engine.last_stats.cancelled == 2 and engine.last_stats.errors == 1
    for r in results:
        if r.finish_reason == "length":
            assert r.tokens == want[r.request_id]
        else:
            assert r.tokens == want[r.request_id][: len(r.tokens)]
    assert run.leftover == []


@pytest.mark.parametrize("kind, ran_out", [("oom", "GPU memory ran out"), ("host-oom", "host memory ran out")])
@pytest.mark.parametrize("mode,extra", [MODES[0], MODES[4]], ids=[MODE_IDS[0], MODE_IDS[4]])
def test_running_out_of_memory_in_a_pass_fails_its_rows_and_serves_the_rest_in_smaller_batches(
        model, mode, extra, kind, ran_out):
    """The rows of the pass that needed the memory fail, saying what ran out and what fits; the run
    goes on admitting one sequence fewer at once, so the waiting requests are served exactly."""
    want = baseline(model, mode, extra)
    fault = Fault(Phase.DENOISE, 0, 1, kind)
    engine = make_engine(model, mode, extra)
    run = Run(engine, fault)
    widths: list[int] = []  # rows of every pass planned after the fault fired
    make_mode = engine.make_mode

    def make_mode_(num_sequences, max_tokens):
        mode_ = make_mode(num_sequences, max_tokens)
        plan = mode_.plan

        def plan_(batch):
            if fault.fired:
                widths.append(batch.num_rows)
            plan(batch)

        mode_.plan = plan_
        return mode_

    engine.make_mode = make_mode_
    reqs = requests()
    results = run.generate(reqs)
    check_isolated(results, reqs, fault, want, engine)
    failed = [r for r in results if r.finish_reason == "error"]
    cap = len(fault.fired) - 1
    for r in failed:
        assert f"{ran_out} (" in r.error and "available now" in r.error or "free now" in r.error, r.error
        assert f"this run goes on with at most {cap} sequences at once; set max_batch_size={cap}" in r.error
    assert widths and max(widths) <= cap
    assert run.leftover == []


@dataclass
class TransferHook:
    """HostKVStore's fault hook, armed to fail the `occurrence`-th `op` ("gather" or "write") of a
    `phase` pass that carries pages of `fault.target`, for those pages only (`TransferFault`).

    Before the hook is armed every GPU page pool is filled with NaN; after every attention of an
    offloaded layer, each slot it read must hold the committed K and V of the page the cache
    directory says is there, as the host store has them (`check_pool`): a page never becomes
    resident with stale or partial contents."""

    fault: Fault
    op: str
    seen: int = 0
    checked: int = 0

    def install(self, mode, request_of: dict[int, str], num_layers: int) -> None:
        store, fetcher = mode.store, mode.fetcher
        fetcher._k.fill_(float("nan"))
        fetcher._v.fill_(float("nan"))

        def hook(op: str, layer, pages: torch.Tensor) -> None:
            batch = mode.batch
            if self.fault.fired or op != self.op or batch.phase is not self.fault.phase:
                return
            target = [s for s in batch.seq_ids if request_of[s] == self.fault.target]
            mine = set(pages.tolist()) & set(store._tables[target[0]]) if target else set()
            if not mine:
                return
            self.seen += 1
            if self.seen == self.fault.occurrence:
                self.fault.fired = tuple(request_of[s] for s in batch.seq_ids)
                raise TransferFault(mine, f"injected {op} fault in the {batch.phase.value} pass")

        store.fault_hook = hook
        run = mode.run

        def run_(layer, q, k, v):
            out = run(layer, q, k, v)
            if layer >= mode.dense_layers and mode.batch.phase is not Phase.PREFILL:
                self.check_pool(mode, layer)
            return out

        mode.run = run_

    def check_pool(self, mode, layer: int) -> None:
        """Every slot the layer's attention just read holds its page's committed K and V."""
        store, directory, p = mode.store, mode.fetcher.directory, mode.page_size
        held, capacity = directory.held[layer], directory.capacity
        slot_table, kv_len = (t.cpu() for t in mode._tables[layer])
        for i, (seq_id, context) in enumerate(zip(mode.batch.seq_ids, mode.batch.context_lens.tolist())):
            table = store._tables[seq_id]
            for h in range(directory.num_kv_heads):
                for slot in slot_table[i, h, :-(-int(kv_len[i, h]) // p)].tolist():
                    partition, local = divmod(slot, capacity)
                    page = int(held.view(-1, capacity)[partition, local])
                    valid = min(p, context - page * p)
                    assert page >= 0 and valid > 0, f"{seq_id}/{h} read slot {slot}, which holds page {page}"
                    for pool, host in ((mode.fetcher.k_pool(layer), store.k(layer)),
                                       (mode.fetcher.v_pool(layer), store.v(layer))):
                        assert torch.equal(pool[slot, :valid], host[table[page], h, :valid]), (
                            f"layer {layer}: {seq_id}/{h} read slot {slot} as page {page}, but its contents differ")
                    self.checked += 1


TRANSFER_FAULTS = {
    "gather-step0": ("gather", Phase.DENOISE, 2, {"source": "cpu"}),
    "gather-step0-compact": ("gather", Phase.DENOISE, 3, {"source": "gpu-compact"}),
    "gather-lookahead": ("gather", Phase.LOOKAHEAD, 2, {"source": "gpu-compact", "lookahead": True}),
    "write-prefill": ("write", Phase.PREFILL, 2, {"source": "cpu"}),
    "write-commit": ("write", Phase.COMMIT, 2, {"source": "gpu-compact", "lookahead": True}),
}


def transfer_run(model, op: str, phase: Phase, occurrence: int, extra: dict) -> tuple[Run, TransferHook]:
    hook = TransferHook(Fault(phase, None, occurrence, "transfer"), op)
    return Run(make_engine(model, "herald", extra), hook), hook


@pytest.mark.parametrize("name", list(TRANSFER_FAULTS))
def test_a_failed_transfer_fails_only_the_requests_whose_pages_it_carried(model, name):
    """A gather or host-store write that fails for the target's pages (the store's fault hook)
    ends the target alone; the others of the pass run their block again and get a fault-free
    run's tokens; no slot ever holds other contents than its page's (checked at every attention)."""
    op, phase, occurrence, extra = TRANSFER_FAULTS[name]
    run, hook = transfer_run(model, op, phase, occurrence, extra)
    reqs = requests()
    results = run.generate(reqs)
    check_isolated(results, reqs, hook.fault, baseline(model, "herald", extra), run.engine)
    [failed] = [r for r in results if r.finish_reason == "error"]
    assert re.search(rf"RequestError: a transfer failed at layer \d+ for host pages \[[\d, ]+( ...)?\]: injected {op} "
                     rf"fault in the {phase.value} pass", failed.error), failed.error
    assert hook.checked > 1000 and run.leftover == []


def test_the_pool_check_sees_a_slot_left_stale(model):
    """The check above has teeth: with the partitions of the rerun rows not cleared, a slot the
    failed gather was given but never filled is read as if it held its page."""
    run, hook = transfer_run(model, "gather", Phase.DENOISE, 2, {"source": "cpu"})
    make_mode = run.engine.make_mode

    def make_mode_(num_sequences, max_tokens):
        mode = make_mode(num_sequences, max_tokens)
        mode.restart_block = lambda seq_ids: None  # the bug: the rerun keeps the failed pass's slots
        return mode

    run.engine.make_mode = make_mode_
    with pytest.raises(AssertionError, match="but its contents differ"):
        run.generate(requests())


def test_the_fault_hook_is_off_by_default(model):
    engine = make_engine(model, "herald", {"source": "cpu"})
    mode = engine.make_mode(2, 64)
    try:
        assert mode.store.fault_hook is None
    finally:
        mode.close()


def test_host_memory_taken_by_others_after_planning_refuses_the_call_and_the_engine_serves_on(model, monkeypatch):
    """Other processes take the host memory between the planner's check and the store's allocation:
    the call is refused saying what ran out and how many pages would fit, nothing stays allocated,
    and the next call, with the memory back, is served."""
    import psutil

    import offload.host_store

    engine = make_engine(model, "herald", {"source": "cpu"})
    reqs = requests(4)
    want = [r.tokens for r in engine.generate(reqs)]  # also warms the process up: RSS settles
    rss = psutil.Process().memory_info().rss

    class Exhausted:
        @staticmethod
        def virtual_memory():
            real = psutil.virtual_memory()  # the store's reserve, plus 32 of its 2 KiB pages
            return real._replace(available=max(512 * 2**20, real.total // 20) + 32 * 2048)

    monkeypatch.setattr(offload.host_store, "psutil", Exhausted)
    with pytest.raises(MemoryError, match=r"HostKVStore needs 0.00 GiB for 56 pages x 4 tokens .* At most 32 pages "
                                          r"\(128 tokens\) fit: lower num_pages or free host memory"):
        engine.generate(reqs)
    assert psutil.Process().memory_info().rss - rss < 16 * 2**20
    monkeypatch.undo()
    assert [r.tokens for r in engine.generate(reqs)] == want
    assert not any(engine.last_occupancy.values())


# ---------------------------------------------------------------------------------------------- GPU
# Real device faults: no injected exception. Models with random weights, fp32, so that every run's
# tokens are exact (the churn tests' GPU run relies on the same: rows decode alike in any batch).

MiB = 2**20


def gpu_engine(model, mode: str, extra: dict, max_batch_size: int, **config) -> Engine:
    sparse = SparseConfig(budget_fraction=0.25, page_size=16, sink_tokens=16, local_window=32, dense_layers=1,
                          **extra)
    return Engine(EngineConfig(model_path="unused", mode=mode, device="cuda", dtype="float32", progress=False,
                               unmasking="fixed", denoising_steps=4, max_batch_size=max_batch_size,
                               prefill_chunk_size=1024, sparse=sparse, **config), model=model)


def gpu_allocated() -> int:
    """torch.cuda.memory_allocated with the device idle and cuBLAS's per-stream workspaces (kept by
    cuBLAS for every stream it ran on, not by the engine) cleared, as benchmarks.soak reads it."""
    torch.cuda.synchronize()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


OOM_MODES = [("dense", {}), ("herald", {"source": "gpu-compact", "lookahead": True})]


class Ballast:
    """Wraps `engine.make_mode`: once the mode is built (the planner has checked the batch and the
    mode has its memory), note the allocator's figures and, when `room` is set, take every byte of
    the GPU but `room` into a ballast tensor, as another tenant of the GPU would after the check."""

    def __init__(self, engine: Engine):
        self.room: int | None = None
        self.tensor: torch.Tensor | None = None
        self.allocated = self.reserved = 0
        make_mode = engine.make_mode

        def make_mode_(num_sequences: int, max_tokens: int):
            mode = make_mode(num_sequences, max_tokens)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.allocated, self.reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            if self.room is not None:
                free, _ = torch.cuda.mem_get_info()
                self.tensor = torch.empty(free - self.room, dtype=torch.uint8, device="cuda")
            return mode

        engine.make_mode = make_mode_


@pytest.mark.gpu
@pytest.mark.parametrize("mode,extra", OOM_MODES, ids=["dense", "herald-lookahead"])
def test_a_real_cuda_oom_in_a_pass_fails_its_rows_and_the_rest_are_served_exactly(mode, extra):
    """Item 4 of issue 35 on the device, nothing injected: once the mode is built (the planner
    passed the batch), a ballast tensor takes the GPU's memory but room for passes of 3 rows, not
    of 4 (each row's pass holds ~200 MB of logits: 64 positions x 262144 ids in fp32, their copy
    and their softmax). The first block's 4 rows run out for real (the caching allocator's
    OutOfMemoryError): they fail saying GPU memory ran out, how much is free and the batch that
    fits; the run goes on 3 rows at a time and the other 6 requests get an undisturbed run's
    tokens; afterwards the engine's GPU memory is back at its baseline, and without the ballast it
    serves a full batch again."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from runtime.checkpoint import random_model
    from runtime.config import ModelConfig, RopeConfig

    vocab, block = 262144, 64
    config = ModelConfig(architecture="qwen3", vocab_size=vocab, hidden_size=256, intermediate_size=512, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=4096,
                         rope=RopeConfig(theta=1e6), qk_norm=True, mask_token_id=vocab - 1, block_size=block)
    model = random_model(config, dtype=torch.float32, device="cuda", std=0.1)
    gen = torch.Generator().manual_seed(5)
    reqs = [GenerationRequest(prompt=torch.randint(0, vocab - 2, (int(n),), generator=gen).tolist(),
                              max_new_tokens=int(new), stop_at_eos=False, request_id=f"r{i}")
            for i, (n, new) in enumerate(zip(torch.randint(70, 300, (10,), generator=gen),
                                             torch.randint(block, 3 * block, (10,), generator=gen)))]
    # eager passes: a CUDA graph's capture cannot give cached memory back mid-capture, so the first
    # pass of each shape would need its memory twice; the eager path is what this measures
    engines = {n: gpu_engine(model, mode, extra, n, cuda_graphs=False) for n in (1, 2, 3, 4)}
    ballasts = {n: Ballast(engine) for n, engine in engines.items()}
    allocated, reserved, tokens = {}, {}, {}
    for n, engine in engines.items():  # every row count's kernels compile here, before any ballast
        gpu_allocated()
        torch.cuda.reset_peak_memory_stats()
        results = engine.generate(reqs)
        # the passes' peak beyond the built mode: live tensors, and the segments the allocator held for them
        allocated[n] = torch.cuda.max_memory_allocated() - ballasts[n].allocated
        reserved[n] = torch.cuda.max_memory_reserved() - ballasts[n].reserved
        assert all(r.finish_reason == "length" for r in results), [r.error for r in results if r.error]
        tokens[n] = {r.request_id: r.tokens for r in results}
    assert tokens[3] == tokens[4], "rows decode differently in batches of 3 and 4: the exactness check cannot hold"
    gap = allocated[4] - reserved[3]
    assert gap >= 64 * MiB, f"4 rows need only {gap / MiB:.0f} MiB more than 3 rows hold ({allocated}, {reserved})"

    engine, ballast = engines[4], ballasts[4]
    base = gpu_allocated()
    ballast.room = reserved[3] + gap // 2  # 3 rows' segments fit with gap/2 to spare; 4 rows' tensors lack gap/2
    results = engine.generate(reqs)
    failed = {r.request_id: r.error for r in results if r.finish_reason == "error"}
    assert set(failed) == {"r0", "r1", "r2", "r3"}, {r.request_id: (r.finish_reason, r.error) for r in results}
    for error in failed.values():
        assert "OutOfMemoryError: CUDA out of memory" in error and "GPU memory ran out (" in error, error
        assert "GiB of the GPU free now)" in error
        assert "this run goes on with at most 3 sequences at once; set max_batch_size=3" in error, error
    for r in results:
        if r.request_id in failed:
            assert r.tokens == tokens[4][r.request_id][: len(r.tokens)]  # what it had committed, nothing more
        else:
            assert r.finish_reason == "length" and r.tokens == tokens[4][r.request_id], r.request_id
    assert engine.last_stats.errors == 4 and not any(engine.last_occupancy.values()), engine.last_occupancy
    assert gpu_allocated() == base + ballast.tensor.numel()  # the failed passes kept nothing
    ballast.room = ballast.tensor = None
    assert gpu_allocated() == base
    again = engine.generate(reqs)  # the memory is back: a full batch is served, exactly
    assert {r.request_id: r.tokens for r in again} == tokens[4] and engine.last_stats.errors == 0
    assert gpu_allocated() == base


@dataclass
class ResidentCheck:
    """Before every pass is planned (the device idle: the lookahead's side work included), every page
    the GPU page cache's directory says a slot holds is compared, over its committed positions, with
    the host store's copy of that page: a page never becomes resident with stale or partial contents.
    The pools start as NaN, so a slot claimed but never written differs too. With `fault` set, the
    host store's fault hook fails the `fault.occurrence`-th `op` transfer ("gather" / "write") of a
    `fault.phase` pass that carries pages of `fault.target`, for those pages (as TransferHook does)."""

    fault: Fault | None = None
    op: str = "gather"
    seen: int = 0
    pages_checked: int = 0
    checks: int = 0

    def install(self, mode, request_of: dict[int, str], num_layers: int) -> None:
        self.mode, self.request_of = mode, request_of
        self.context: dict[int, int] = {}  # sequence -> committed tokens, as its last pass said
        mode.fetcher._k.fill_(float("nan"))
        mode.fetcher._v.fill_(float("nan"))
        plan = mode.plan

        def plan_(batch: ForwardBatch) -> None:
            self.check()
            for seq_id, length in zip(batch.seq_ids, batch.context_lens.tolist()):
                self.context[seq_id] = max(self.context.get(seq_id, 0), int(length))
            plan(batch)

        mode.plan = plan_
        if self.fault is not None:
            mode.store.fault_hook = self.hook

    def hook(self, op: str, layer, pages: torch.Tensor) -> None:
        fault, batch, store = self.fault, self.mode.batch, self.mode.store
        if fault.fired or op != self.op or batch is None or batch.phase is not fault.phase:
            return
        target = [s for s in batch.seq_ids if self.request_of[s] == fault.target]
        mine = set(pages.tolist()) & set(store._tables[target[0]]) if target else set()
        if not mine:
            return
        self.seen += 1
        if self.seen == fault.occurrence:
            fault.fired = tuple(self.request_of[s] for s in batch.seq_ids)
            raise TransferFault(mine, f"injected {op} fault in the {batch.phase.value} pass")

    def check(self) -> None:
        mode = self.mode
        if mode.cuda:  # the lookahead's side work and every gather done: what the directory says is final
            torch.cuda.synchronize()
        directory, store, p = mode.fetcher.directory, mode.store, mode.page_size
        held = directory.held.cpu()  # [L, rows, Hkv, capacity] logical page of each slot, -1: none
        seq_of_row = {row: seq for seq, row in mode.row_of.items()}
        for layer in range(mode.dense_layers, mode.num_layers):
            rows, heads, local = (held[layer] >= 0).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            assert all(int(r) in seq_of_row for r in rows.unique()), f"layer {layer}: a free row holds pages"
            logical = held[layer][rows, heads, local].long()
            seqs = [seq_of_row[int(r)] for r in rows]
            physical = torch.tensor([store._tables[s][int(page)] for s, page in zip(seqs, logical)])
            committed = torch.tensor([self.context.get(s, 0) for s in seqs])
            valid = torch.arange(p)[None, :] < (committed - logical * p)[:, None]  # [n, P] committed positions
            slots = (rows * directory.num_kv_heads + heads) * directory.capacity + local
            for pool, host in ((mode.fetcher.k_pool(layer), store.k(layer)), (mode.fetcher.v_pool(layer), store.v(layer))):
                resident, truth = pool[slots.to(pool.device)].cpu(), host[physical, heads]
                differs = ((resident != truth) & valid[:, :, None]).any(dim=-1).any(dim=-1)
                assert not bool(differs.any()), (
                    f"layer {layer}: {int(differs.sum())} resident pages differ from the host store's copy, e.g. "
                    f"page {int(logical[differs][0])} of sequence {seqs[int(differs.nonzero()[0])]} in slot "
                    f"{int(slots[differs][0])}")
            self.pages_checked += int((valid.any(dim=1)).sum())
        self.checks += 1


def resident_engine(model) -> Engine:
    return gpu_engine(model, "herald", {"source": "gpu-compact", "lookahead": True}, 3)


def resident_requests() -> list[GenerationRequest]:
    """Prompts of 1.5K-5K tokens (a 25% budget selects a real subset of their 16-token pages) and
    4-6 blocks of 16 each; r1, the target, runs in the first batch of 3."""
    gen = torch.Generator().manual_seed(11)
    lengths, blocks = [3100, 4900, 1500, 2600, 4100], [5, 6, 4, 6, 5]
    return [GenerationRequest(prompt=torch.randint(0, 62, (n,), generator=gen).tolist(), max_new_tokens=16 * b,
                              stop_at_eos=False, request_id=f"r{i}") for i, (n, b) in enumerate(zip(lengths, blocks))]


@pytest.fixture(scope="module")
def gpu_model():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from runtime.checkpoint import random_model
    from runtime.config import ModelConfig, RopeConfig

    config = ModelConfig(architecture="qwen3", vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=32768,
                         rope=RopeConfig(theta=1e6), qk_norm=True, mask_token_id=63, block_size=16)
    return random_model(config, dtype=torch.float32, device="cuda", std=0.1)


@pytest.mark.gpu
def test_resident_pages_match_the_host_store_over_blocks_with_the_lookahead(gpu_model):
    """Item 5 of issue 35 without faults: herald with the lookahead on CUDA (its side passes, CUDA
    graphs and all) over several blocks; before every pass every page the GPU cache claims resident
    holds the host store's bytes of that page."""
    check = ResidentCheck()
    run = Run(resident_engine(gpu_model), check)
    results = run.generate(resident_requests())
    assert all(r.finish_reason == "length" for r in results), [r.error for r in results]
    assert check.checks > 30 and check.pages_checked > 5000, (check.checks, check.pages_checked)
    assert run.leftover == []


@pytest.mark.gpu
@pytest.mark.parametrize("op,phase,occurrence", [("gather", Phase.LOOKAHEAD, 2), ("gather", Phase.DENOISE, 3),
                                                 ("write", Phase.COMMIT, 2)],
                         ids=["gather-lookahead", "gather-step0", "write-commit"])
def test_a_failed_transfer_on_the_gpu_leaves_no_stale_page_resident(gpu_model, op, phase, occurrence):
    """Item 5 with a fault mid-run: the host store's fault hook fails a gather (the lookahead's side
    fetch, or step 0's) or a commit's write for the target's pages. The target alone fails; the
    pass's other rows run their block again and get the fault-free run's tokens; and before every
    pass, before and after the fault, no page the GPU cache claims resident differs from the host's."""
    want = {r.request_id: r.tokens for r in resident_engine(gpu_model).generate(resident_requests())}
    check = ResidentCheck(Fault(phase, None, occurrence, "transfer"), op)
    run = Run(resident_engine(gpu_model), check)
    reqs = resident_requests()
    results = run.generate(reqs)
    check_isolated(results, reqs, check.fault, want, run.engine)
    [failed] = [r for r in results if r.finish_reason == "error"]
    assert f"injected {op} fault in the {phase.value} pass" in failed.error and "a transfer failed" in failed.error
    assert check.checks > 30 and check.pages_checked > 5000, (check.checks, check.pages_checked)
    assert run.leftover == []


def test_the_resident_check_sees_a_page_that_differs_from_the_host(model):
    """ResidentCheck (the GPU tests' checksum) has teeth, shown on the CPU where it runs the same:
    one value of one resident page changed makes it fail, naming the page."""
    check = ResidentCheck()
    run = Run(make_engine(model, "herald", {"source": "cpu"}), check)
    honest = check.check

    def check_after_corrupting() -> None:
        mode = check.mode
        directory = mode.fetcher.directory
        held = (directory.held[1] >= 0).nonzero()
        if len(held):
            row, head, local = (int(x) for x in held[0])
            mode.fetcher.k_pool(1)[(row * directory.num_kv_heads + head) * directory.capacity + local, 0, 0] += 1.0
        honest()

    check.check = check_after_corrupting
    with pytest.raises(AssertionError, match=r"layer 1: 1 resident pages differ from the host store's copy"):
        run.generate(requests())
