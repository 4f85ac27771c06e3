"""Churn: many requests of random lengths through every mode, some cancelled before they start
and some mid-block. Nothing is lost: survivors get exactly the tokens they get without any
cancellation, cancelled requests keep what they had committed, and afterwards every slot, page,
row and cache partition is free again."""
import random

import pytest
import torch

from runtime import Engine, EngineConfig
from runtime.attention import Phase
from runtime.checkpoint import random_model
from runtime.config import ModelConfig, RopeConfig, SparseConfig
from runtime.decoding import GenerationRequest
from tests.runtime.kv_checks import assert_released
from tests.runtime.test_sparse_modes import VOCAB, tiny_model

MODES = [("dense", {}), ("mage", {}), ("quest", {}), ("herald", {"source": "gpu-compact"}),
         ("herald", {"source": "cpu", "lookahead": True})]


@pytest.fixture(scope="module")
def model():
    return tiny_model().to(torch.float32)


def requests(count, seed):
    rng = random.Random(seed)
    return [GenerationRequest(prompt=[rng.randrange(VOCAB - 2) for _ in range(rng.randint(3, 120))],
                              max_new_tokens=rng.randint(1, 14), stop_at_eos=False, request_id=f"r{i}")
            for i in range(count)]


def cancel_plan(reqs, seed):
    """request id -> the how-many-th question about it answers yes (1: before it starts)."""
    rng = random.Random(seed)
    return {r.request_id: rng.randint(1, 12) for r in reqs if rng.random() < 0.35}


def engine_for(model, mode, extra):
    sparse = SparseConfig(budget_fraction=0.3, page_size=4, sink_tokens=4, local_window=8, dense_layers=1,
                          compact_group=16, check_residency=True, **extra)
    return Engine(EngineConfig(model_path="unused", mode=mode, device="cpu", dtype="float32", progress=False,
                               unmasking="threshold", max_batch_size=4, prefill_chunk_size=32, sparse=sparse),
                  model=model)


@pytest.mark.parametrize("mode,extra", MODES)
def test_churn_with_cancellations_loses_nothing(model, mode, extra):
    reqs = requests(36, seed=7)
    plan = cancel_plan(reqs, seed=8)
    asked: dict[str, int] = {}

    def should_cancel(request_id: str) -> bool:
        asked[request_id] = asked.get(request_id, 0) + 1
        return asked[request_id] == plan.get(request_id)

    engine = engine_for(model, mode, extra)
    baseline = {r.request_id: r.tokens for r in engine.generate(reqs)}
    sequences = [engine.make_sequence(r) for r in reqs]
    attention = engine.make_mode(4, max(s.max_tokens for s in sequences))
    loop = engine.make_loop(attention, 4)
    try:
        with torch.no_grad():
            done = loop.run(sequences, should_cancel=lambda seq: should_cancel(seq.request.request_id))
        assert sorted(s.request.request_id for s in done) == sorted(r.request_id for r in reqs)
        cancelled = [s for s in done if s.finish_reason == "cancelled"]
        assert cancelled and len(cancelled) < len(reqs)
        for seq in done:
            got = seq.generated
            want = baseline[seq.request.request_id]
            if seq.finish_reason == "cancelled":
                assert got == want[: len(got)]  # what it had committed, nothing invented
            else:
                assert got == want
        assert_released(attention, 4)  # every piece of memory is free again
    finally:
        attention.close()


@pytest.mark.gpu
def test_cancel_while_lookahead_transfers_are_in_flight():
    """herald with the lookahead on CUDA: a request cancelled while its block's LOOKAHEAD (scan,
    diff and the gather of the next block's pages) still runs on the side stream gives its cache
    partition back only after that work is done, so a request taking the partition over never
    sees a late gather land in it; the other requests get the tokens of a run without the cancel."""
    config = ModelConfig(architecture="qwen3", vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=32768,
                         rope=RopeConfig(theta=1e6), qk_norm=True, mask_token_id=63, block_size=16)
    model = random_model(config, dtype=torch.float32, device="cuda", std=0.1)
    sparse = SparseConfig(budget_fraction=0.25, page_size=16, sink_tokens=16, local_window=32, dense_layers=1,
                          source="gpu-compact", lookahead=True)
    engine = Engine(EngineConfig(model_path="unused", mode="herald", device="cuda", dtype="float32", progress=False,
                                 unmasking="fixed", denoising_steps=4, max_batch_size=3, prefill_chunk_size=4096,
                                 sparse=sparse), model=model)
    gen = torch.Generator().manual_seed(0)
    reqs = [GenerationRequest(prompt=torch.randint(0, 62, (n,), generator=gen).tolist(), max_new_tokens=64,
                              stop_at_eos=False, request_id=f"r{i}")
            for i, n in enumerate([16000, 12000, 14000, 9000])]  # r3 waits for a free row

    def run(victim: str | None):
        seqs = [engine.make_sequence(r) for r in reqs]
        attention = engine.make_mode(3, max(s.max_tokens for s in seqs))
        loop = engine.make_loop(attention, 3)
        side = attention.lookahead_stream
        releases: list[bool] = []  # at each partition reset of a removal: were the side streams done?
        rows: dict[str, int] = {}
        removing = []
        plan, remove, add = attention.plan, attention.remove_sequence, attention.add_sequence
        reset = attention.fetcher.directory.reset_rows

        def plan_(batch):
            plan(batch)
            if batch.phase is Phase.LOOKAHEAD:  # the side pass queues behind ~25 ms: surely in flight when asked
                with torch.cuda.stream(side):
                    torch.cuda._sleep(50_000_000)

        def remove_(seq_id):
            removing.append(seq_id)
            try:
                remove(seq_id)
            finally:
                removing.pop()

        def reset_(partitions):
            if removing:
                releases.append(side.query() and attention.fetcher.gather_stream.query())
            reset(partitions)

        def add_(seq_id, max_tokens):
            add(seq_id, max_tokens)
            rows[next(s.request.request_id for s in seqs if s.seq_id == seq_id)] = attention.row_of[seq_id]

        attention.plan, attention.remove_sequence, attention.add_sequence = plan_, remove_, add_
        attention.fetcher.directory.reset_rows = reset_
        in_flight_at_cancel = []  # the victim's block at the cancel

        def should_cancel(seq) -> bool:
            # after its first block, the first question asked while the side stream still works
            if seq.request.request_id != victim or in_flight_at_cancel or seq.blocks_done == 0 or side.query():
                return False
            in_flight_at_cancel.append(seq.blocks_done)
            return True

        try:
            with torch.no_grad():
                done = loop.run(seqs, should_cancel=should_cancel)
            assert_released(attention, 3)
        finally:
            attention.close()
        return {s.request.request_id: s for s in done}, releases, rows, in_flight_at_cancel

    baseline, _, _, _ = run(None)
    done, releases, rows, in_flight_at_cancel = run("r1")
    assert in_flight_at_cancel and done["r1"].finish_reason == "cancelled", \
        "the victim was never asked while a lookahead ran: nothing was tested"
    assert releases and all(releases), f"a partition was released while the side stream still ran: {releases}"
    assert rows["r3"] == rows["r1"]  # the waiting request took the cancelled one's partition over
    for rid in ("r0", "r2", "r3"):
        assert done[rid].finish_reason == "length" and done[rid].generated == baseline[rid].generated, rid
    assert done["r1"].generated == baseline["r1"].generated[: len(done["r1"].generated)]
