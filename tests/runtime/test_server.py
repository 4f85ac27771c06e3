"""The OpenAI-compatible server, started for real on loopback and driven by the official
`openai` client (and raw HTTP for what a client library would not send)."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the `server`/`test` extra: pip install -e '.[test]'")
try:  # openai's HTTP library: httpx, or httpx2 in its newer releases
    import httpx
except ImportError:
    httpx = pytest.importorskip("httpx2", reason="needs httpx or httpx2 (comes with openai)")
pytest.importorskip("fastapi", reason="the server needs the `server` extra (FastAPI, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the `server` extra (FastAPI, uvicorn)")

from runtime import Engine, EngineConfig  # noqa: E402
from runtime.engine import CHECKPOINTS  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402

TINY = CHECKPOINTS / "tiny-random"
KEY = "sk-test-key"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


def start_server(template, *extra):
    """`python -m runtime.server` on a free loopback port: yields its base URL, stops it after."""
    port = free_port()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.server", "--model", str(TINY), "--device", "cpu", "--dtype", "float64",
         "--port", str(port), "--api-key", KEY, "--served-model-name", "tiny", "--chat-template", str(template),
         "--max-prompt-tokens", "64", "--max-tokens", "1000", "--max-batch-size", "4", *extra],
        # one intra-op thread: on a shared 2-core machine torch's OpenMP threads, spinning at their
        # barriers beside the server's event loop and this client, made blocks ~15x slower
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.stdout.read()}")
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(template):
    yield from start_server(template)


@pytest.fixture(scope="module")
def herald_server(template):
    yield from start_server(template, "--mode", "herald", "--budget", "0.25", "--dense-layers", "1")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def engine(server, template):
    return Engine(EngineConfig(model_path=str(TINY), device="cpu", dtype="float64", progress=False,
                               chat_template=str(template)))


def offline(engine, prompt, n=8):
    return engine.generate([prompt], sampling_params=SamplingParams(max_new_tokens=n, ignore_eos=True))[0].text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_completion_matches_offline_generate_streamed_or_not(client, engine):
    args = dict(model="tiny", prompt="abcdef", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    done = client.completions.create(**args)
    assert done.choices[0].text == offline(engine, "abcdef")
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 8
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    *chunks, usage = chunks
    assert len(chunks) >= 2 and not usage.choices and usage.usage.completion_tokens == 8
    assert usage.usage.prompt_tokens == done.usage.prompt_tokens
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completion_through_the_template(client, engine):
    messages = [{"role": "user", "content": "hello"}]
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
    # the template's markers are control tokens and the message stays text: as the engine renders a conversation
    assert engine.apply_chat_template(messages).endswith("<|im_start|>assistant\n")
    assert done.choices[0].message.content == offline(engine, messages)
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == done.choices[0].message.content


def test_concurrent_requests_are_batched_and_each_gets_its_own(client, engine):
    prompts = ["abcdef", "hello", "x", "zzz top"]
    got = {}

    def ask(p):
        got[p] = client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {p: offline(engine, p, 6) for p in prompts}


def test_n_stop_and_seed_map_onto_sampling_params(client, engine):
    done = client.completions.create(model="tiny", prompt="abcdef", max_tokens=8, temperature=1.0, seed=4, n=2,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in done.choices] == [0, 1]
    again = client.completions.create(model="tiny", prompt="abcdef", max_tokens=8, temperature=1.0, seed=4, n=2,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in done.choices]
    full = offline(engine, "abcdef")
    cut = client.completions.create(model="tiny", prompt="abcdef", max_tokens=8, temperature=0, stop=[full[2:4]],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[:full.find(full[2:4])] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors_and_the_server_stays_up(client, server):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="a", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.BadRequestError, match="more than this server allows"):
        client.completions.create(model="tiny", prompt="y" * 100)
    with pytest.raises(openai.BadRequestError, match="max_tokens=5000"):
        client.completions.create(model="tiny", prompt="a", max_tokens=5000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    assert raw.json()["error"]["type"] == "invalid_request_error"
    big = httpx.post(f"{server}/v1/completions", content=b" " * (2 << 20), headers={"Authorization": f"Bearer {KEY}"})
    assert big.status_code == 413
    assert client.completions.create(model="tiny", prompt="a", max_tokens=4).choices[0].finish_reason


def health(base):
    return httpx.get(f"{base}/health").json()


def settle(base, timeout=30):
    """/health once nothing is pending any more."""
    deadline = time.time() + timeout
    while (h := health(base))["pending"] and time.time() < deadline:
        time.sleep(0.05)
    return h


@pytest.mark.parametrize("which", ["server", "herald_server"])
def test_a_request_arriving_mid_batch_joins_the_running_batch(request, which, engine):
    base = request.getfixturevalue(which)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    settle(base)
    long = iter(client.completions.create(model="tiny", prompt="abc", max_tokens=600, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True}))
    assert next(long).choices[0].text is not None  # the long request's first block committed: its batch runs
    short = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    # the short one came back while the long one still ran: it joined the running batch, it did not wait for it
    during = health(base)
    assert during["pending"] == 1 and during["kv"]["sequences"] == 1
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 8
    if which == "server":  # dense: a batch mate changes nothing in a request's tokens
        assert short.choices[0].text == offline(engine, "hello")
    rest = list(long)
    assert rest[-1].choices[0].finish_reason == "length"
    assert settle(base)["pending"] == 0


@pytest.mark.parametrize("which", ["server", "herald_server"])
def test_a_client_that_disconnects_cancels_its_request_and_frees_its_kv(request, which):
    base = request.getfixturevalue(which)
    baseline = settle(base)
    assert baseline["kv"] and not any(baseline["kv"].values())
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 1000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        lines = response.iter_lines()  # kept: a dropped line iterator closes the response
        first = next(lines)
        assert first.startswith("data: ") and "choices" in json.loads(first[6:])
        assert health(base)["kv"]["sequences"] == 1  # it holds KV while it runs
    after = settle(base)
    assert after["pending"] == 0 and after["kv"] == baseline["kv"]
    cancelled = baseline["finished"].get("cancelled", 0)
    assert after["finished"]["cancelled"] == cancelled + 1
    # a client waiting for a whole (non-streamed) answer that leaves cancels it too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, timeout=0.5,
                   headers={"Authorization": f"Bearer {KEY}"})
    after = settle(base)
    assert after["finished"]["cancelled"] == cancelled + 2 and after["kv"] == baseline["kv"]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="tiny", prompt="a", max_tokens=4).choices[0].text is not None


def test_a_call_that_fails_as_a_whole_answers_every_job_and_the_worker_goes_on(monkeypatch):
    """The worker's generate call raising (here: its mode cannot be built) fails the jobs it holds with a
    500, drops what it had not taken, and the next job runs on a new call."""
    import asyncio

    from runtime.server import ApiError, EngineWorker, Job

    engine = Engine(EngineConfig(model_path=str(TINY), device="cpu", dtype="float64", progress=False))
    original, calls = engine.make_mode, []

    def make_mode(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("injected: no mode")
        return original(*args)

    monkeypatch.setattr(engine, "make_mode", make_mode)
    worker = EngineWorker(engine, max_pending=8, max_tokens=64)

    async def ask(request_id):
        job = Job(SamplingParams(max_new_tokens=4).requests("abc", request_id), asyncio.get_running_loop())
        worker.submit(job)
        items = []
        while (item := await asyncio.wait_for(job.events.get(), 30)) is not None:
            items.append(item)
        return items

    failed = asyncio.run(ask("a"))
    assert len(failed) == 1 and isinstance(failed[0], ApiError) and "injected" in failed[0].message
    assert worker.pending == 0
    served = asyncio.run(ask("b"))
    assert served[-1].finished and served[-1].finish_reason == "length" and len(calls) == 2
    worker.close()
    worker.thread.join(30)
    assert not worker.thread.is_alive()
