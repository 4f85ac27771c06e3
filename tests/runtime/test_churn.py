"""Churn: many requests of random lengths through every mode, some cancelled before they start
and some mid-block. Nothing is lost: survivors get exactly the tokens they get without any
cancellation, cancelled requests keep what they had committed, and afterwards every slot, page,
row and cache partition is free again."""
import random

import pytest
import torch

from runtime import Engine, EngineConfig
from runtime.config import SparseConfig
from runtime.decoding import GenerationRequest
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
        # every piece of memory is free again
        if mode == "herald":
            assert attention.store.used_pages == 0 and not attention.row_of
            assert (attention.cache.held == -1).all()
            if attention.dense is not None:
                assert not attention.dense.slot_of
        else:
            assert not attention.slot_of and len(attention.free_slots) == 4
    finally:
        attention.close()
