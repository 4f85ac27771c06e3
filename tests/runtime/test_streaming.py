"""Engine.stream / async_stream / async_generate, interrupted calls, per-call stats."""
import asyncio
import time

import pytest

from runtime import Engine, EngineConfig, GenerationRequest
from runtime.engine import CHECKPOINTS
from runtime.sampling import SamplingParams

TINY = CHECKPOINTS / "tiny-random"
PROMPTS = ["abcdef", "hello", "x"]
PARAMS = SamplingParams(max_new_tokens=14, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(model_path=str(TINY), device="cpu", dtype="float64", progress=False,
                               max_batch_size=2))


def by_request(events):
    texts, finals = {}, {}
    for event in events:
        assert event.request_id not in finals, "no event after a request's last one"
        texts[event.request_id] = texts.get(event.request_id, "") + event.text
        if event.finished:
            finals[event.request_id] = event
    return texts, finals


def test_stream_texts_add_up_to_the_results(engine):
    results = engine.generate(PROMPTS, sampling_params=PARAMS)
    events = list(engine.stream(PROMPTS, sampling_params=PARAMS))
    assert sum(not e.finished for e in events) >= len(PROMPTS)  # text came before the end
    texts, finals = by_request(events)
    for r in results:
        assert texts[r.request_id] == r.text
        assert finals[r.request_id].result.tokens == r.tokens
        assert finals[r.request_id].finish_reason == "length"


def test_streamed_stop_string_is_never_sent(engine):
    [full] = engine.generate([PROMPTS[0]], sampling_params=PARAMS)
    stop = full.text[3:6]
    events = list(engine.stream([PROMPTS[0]], sampling_params=SamplingParams(max_new_tokens=14, ignore_eos=True,
                                                                             stop=[stop])))
    texts, finals = by_request(events)
    assert texts["0"] == full.text[:full.text.find(stop)] == finals["0"].result.text
    assert finals["0"].finish_reason == "stop"


def test_leaving_a_stream_early_cancels_and_frees_the_engine(engine):
    for event in engine.stream(PROMPTS, sampling_params=SamplingParams(max_new_tokens=400, ignore_eos=True)):
        break
    assert not engine.generate_lock.locked()
    assert engine.last_stats.cancelled == len(PROMPTS)
    assert engine.generate(PROMPTS, sampling_params=PARAMS)[0].finish_reason == "length"


def test_async_generate_and_async_stream(engine):
    expected = engine.generate(PROMPTS, sampling_params=PARAMS)

    async def main():
        both = await asyncio.gather(engine.async_generate(PROMPTS, sampling_params=PARAMS),
                                    engine.async_generate(PROMPTS[:1], sampling_params=PARAMS))
        events = [e async for e in engine.async_stream(PROMPTS, sampling_params=PARAMS)]
        return both, events

    (first, second), events = asyncio.run(main())
    assert [r.tokens for r in first] == [r.tokens for r in expected]
    assert second[0].tokens == expected[0].tokens
    assert by_request(events)[0] == {r.request_id: r.text for r in expected}


def test_interrupt_returns_the_finished_requests(engine):
    asked = []

    def interrupt(request_id):
        asked.append(request_id)
        if len(asked) > 60:
            raise KeyboardInterrupt
        return False

    prompts = [GenerationRequest(prompt="ab", max_new_tokens=4, stop_at_eos=False),
               GenerationRequest(prompt="cd", max_new_tokens=400, stop_at_eos=False)]
    results = engine.generate(prompts, should_cancel=interrupt)
    assert results.stats.interrupted and engine.last_stats is results.stats
    assert results[0].finish_reason == "length" and len(results[0].tokens) == 4
    assert results[1].finish_reason == "cancelled" and "KeyboardInterrupt" in results[1].error
    assert 0 < len(results[1].tokens) < 400


def test_stats_come_with_each_call(engine):
    a = engine.generate(PROMPTS[:1], sampling_params=PARAMS)
    b = engine.generate(PROMPTS, sampling_params=PARAMS)
    assert a.stats is not b.stats and engine.last_stats is b.stats
    assert a.stats.requests == 1 and b.stats.requests == 3
    assert 0 < b.stats.first_block_s <= b.stats.wall_s
    assert b.stats.generated_tokens == sum(len(r.tokens) for r in b)




def test_a_fed_request_joins_the_running_call_and_a_bad_one_fails_alone(engine):
    """generate(feed=...): requests put in while it runs join its batch at a block boundary; their
    results come through on_commit only, equal to a call of their own; the call ends when the feed closes."""
    import threading

    from runtime.feed import RequestFeed

    expected = engine.generate(["hello"], sampling_params=PARAMS)[0]
    feed = RequestFeed(max_tokens=96)
    events = []

    def on_commit(event):
        events.append(event)
        if event.request_id == "long" and len(events) == 1:  # the long request runs: feed two more
            feed.put(PARAMS.requests("hello", "short"))
            feed.put(SamplingParams(max_new_tokens=100).requests("x", "too-long"))

    long = SamplingParams(max_new_tokens=60, ignore_eos=True).requests("abcdef", "long")
    worker = threading.Thread(target=lambda: engine.generate(long, feed=feed, on_commit=on_commit))
    worker.start()
    deadline = time.time() + 60
    while not any(e.finished and e.request_id == "long" for e in events) and time.time() < deadline:
        time.sleep(0.01)
    feed.close()
    worker.join(30)
    assert not worker.is_alive()
    ends = [e for e in events if e.finished]
    assert [e.request_id for e in ends] == ["too-long", "short", "long"]  # the short one finished first
    assert "beyond the 96 positions" in ends[0].result.error and ends[0].finish_reason == "error"
    assert ends[1].result.tokens == expected.tokens and ends[1].result.text == expected.text
    assert engine.last_stats.requests == 3 and engine.last_stats.errors == 1
    assert not any(engine.occupancy().values())
