"""An OpenAI-compatible HTTP server over one Engine: `dllm serve --model DIR` or
`python -m runtime.server --model DIR` (needs the `server` extra: FastAPI and uvicorn).

Endpoints: POST /v1/completions and /v1/chat/completions (chat through the checkpoint's chat
template, or --chat-template), both with `"stream": true` as server-sent events; GET /v1/models
and /health. The OpenAI fields map onto `SamplingParams` (max_tokens, temperature, top_p, seed,
stop, n, logprobs; and vLLM's extras top_k, min_p, min_tokens, ignore_eos, skip_special_tokens,
include_stop_str_in_output). One engine worker thread runs one generate call for the server's
life and feeds it every request as it arrives (runtime/feed.py): a request joins the running batch
at the next block boundary, whatever the attention mode, instead of waiting for the batch to end
(continuous batching across HTTP requests). A request is checked before it joins (its fields, its
prompt's tokens and length): a bad one gets a 400 with an OpenAI-style error object and touches no
other. A client that leaves, streamed or not, cancels its requests before their next pass, which
frees their KV (/health's `kv` shows what the mode holds). More than --max-pending waiting or
running requests: 503. The batch is sized at start for --max-batch-size requests of
--max-prompt-tokens + --max-tokens positions, and a server whose batch would not fit is refused then.
It binds to 127.0.0.1 unless told otherwise; with --api-key every /v1 call needs
`Authorization: Bearer KEY` (401 otherwise).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from runtime.decoding import GenerationRequest, GenerationResult
from runtime.feed import RequestFeed
from runtime.sampling import SamplingParams
from runtime.streaming import StreamEvent

try:
    import fastapi
    import uvicorn
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError as err:  # the optional extra
    raise ImportError(f"the server needs FastAPI and uvicorn ({err}): pip install 'dllm-offload[server]'") from err

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


class ApiError(Exception):
    """An OpenAI-style error: status code, message, the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.status}}, status_code=self.status)


@dataclass(eq=False)
class Job:
    """One HTTP request's engine requests and where their events go (its event loop's queue)."""

    requests: list[GenerationRequest]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    left: int = 0  # its requests not yet ended

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class EngineWorker:
    """The one thread that runs the engine: one generate call for the server's life, fed every
    request as it arrives (runtime/feed.py), so that each joins the running batch at the next
    block boundary and leaves it, freeing its KV, as soon as it ends or its client goes. The call
    holds the engine's generate_lock meanwhile: the engine serves this server alone."""

    def __init__(self, engine, max_pending: int, max_tokens: int):
        self.engine, self.max_pending = engine, max_pending
        self.feed = RequestFeed(max_tokens)
        self.owner: dict[str, Job] = {}  # request id -> its job, while it runs or waits
        self.pending = 0
        self.finished: Counter[str] = Counter()  # requests ended, by finish_reason (/health)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, name="dllm-server-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.pending + len(job.requests) > self.max_pending:
                raise ApiError(503, f"the server is at capacity ({self.pending} requests waiting or running, at most "
                                    f"{self.max_pending}): retry later", kind="server_overloaded")
            self.pending += len(job.requests)
            job.left = len(job.requests)
            self.owner.update((r.request_id, job) for r in job.requests)
            self.feed.put(job.requests)  # under the lock: a failed call drains the feed and its jobs at once

    def close(self) -> None:
        self.feed.close()

    def _cancelled(self, request_id: str) -> bool:
        job = self.owner.get(request_id)
        return job is None or job.cancelled

    def _on_commit(self, event: StreamEvent) -> None:
        job = self.owner.get(event.request_id)
        if job is None:  # its job already failed as a whole
            return
        job.put(event)
        if event.finished:
            self.finished[event.finish_reason] += 1
            self._ended(job, [event.request_id])

    def _ended(self, job: Job, request_ids: list[str]) -> None:
        with self.lock:
            for request_id in request_ids:
                if self.owner.pop(request_id, None) is not None:
                    job.left -= 1
                    self.pending -= 1
            done = job.left == 0
        if done:
            job.put(None)

    def _serve(self) -> None:
        while self.feed.wait():  # False: closed with nothing queued
            try:
                with self.engine.generate_lock:
                    self.engine.generate([], feed=self.feed, should_cancel=self._cancelled, on_commit=self._on_commit)
            except Exception as err:  # the call failed as a whole (e.g. a broken invariant): every job hears it
                with self.lock:  # what it had not taken yet goes too, or the next call would fail on it again
                    self.feed.take()
                    jobs = {id(j): j for j in self.owner.values()}.values()
                for job in jobs:
                    job.cancelled = True
                    job.put(ApiError(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error"))
                    self._ended(job, [r.request_id for r in job.requests])


def _field(body: dict, name: str, kinds: tuple, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' must be {' or '.join(k.__name__ for k in kinds)}, not {value!r}", name)
    return value


class Server:
    """The FastAPI app and what it needs: the engine worker, the model's name, the limits."""

    def __init__(self, engine, model_name: str, api_key: str | None = None, max_pending: int = 64,
                 max_body_bytes: int = 1 << 20, max_prompt_tokens: int | None = None, max_tokens: int = 4096):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_body_bytes, self.max_tokens = max_body_bytes, max_tokens
        self.max_prompt_tokens = max_prompt_tokens or engine.model_config.max_position_embeddings
        # the running batch holds its rows' KV for the longest request the limits let in: refuse at
        # start a batch of those that does not fit, rather than every request later
        capacity = min(self.max_prompt_tokens + max_tokens, engine.model_config.max_position_embeddings)
        engine.check_memory(engine.config.max_batch_size, engine.feed_capacity(RequestFeed(capacity)))
        self.worker = EngineWorker(engine, max_pending, capacity)
        self._ids = itertools.count()
        self.app = self._make_app()

    def _make_app(self) -> fastapi.FastAPI:
        app = fastapi.FastAPI(title="dllm-offload", docs_url=None, redoc_url=None)

        @app.exception_handler(ApiError)
        async def api_error(_request, err: ApiError):
            return err.response()

        @app.get("/health")
        async def health():
            # kv: what the attention mode holds now (sequences, KV slots, host pages): all 0 when idle
            return {"status": "ok", "pending": self.worker.pending, "kv": self.engine.occupancy(),
                    "finished": dict(self.worker.finished)}

        @app.get("/v1/models")
        async def models(request: fastapi.Request):
            self._authorize(request)
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                "owned_by": "dllm-offload"}]}

        @app.post("/v1/completions")
        async def completions(request: fastapi.Request):
            return await self._handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: fastapi.Request):
            return await self._handle(request, chat=True)

        return app

    def _authorize(self, request: fastapi.Request) -> None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", kind="authentication_error")

    async def _body(self, request: fastapi.Request) -> dict:
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            raise ApiError(413, f"the request body has {len(raw)} bytes, more than the server's "
                                f"{self.max_body_bytes} (--max-body-bytes)")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from err
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist: this server serves {self.model_name!r}",
                           "model", kind="model_not_found")
        return body

    def sampling(self, body: dict, chat: bool) -> SamplingParams:
        """The OpenAI fields of a request as SamplingParams (400 naming the field when one is bad)."""
        max_tokens = _field(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                            (int,), 16 if not chat else min(512, self.max_tokens))
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise ApiError(400, f"max_tokens={max_tokens} is more than this server allows ({self.max_tokens}, "
                                "--max-tokens)", "max_tokens")
        stop = _field(body, "stop", (str, list), ())
        logprobs = _field(body, "logprobs", (bool, int), False)
        options = {
            "max_new_tokens": max_tokens, "temperature": _field(body, "temperature", (int, float), 1.0),
            "top_p": _field(body, "top_p", (int, float)), "top_k": _field(body, "top_k", (int,)),
            "min_p": _field(body, "min_p", (int, float), 0.0), "seed": _field(body, "seed", (int,), 0),
            "stop": [stop] if isinstance(stop, str) else stop, "n": _field(body, "n", (int,), 1),
            "min_new_tokens": _field(body, "min_tokens", (int,), 0),
            "stop_token_ids": _field(body, "stop_token_ids", (list,), ()),
            "ignore_eos": _field(body, "ignore_eos", (bool,), False),
            "skip_special_tokens": _field(body, "skip_special_tokens", (bool,), True),
            "include_stop_str_in_output": _field(body, "include_stop_str_in_output", (bool,), False),
            "logprobs": bool(logprobs),
        }
        if options["top_p"] is not None and options["top_p"] >= 1.0:
            options["top_p"] = None
        if options["top_k"] is not None and options["top_k"] <= 0:  # vLLM's "no top-k"
            options["top_k"] = None
        try:
            return SamplingParams(**options)
        except ValueError as err:
            raise ApiError(400, str(err).replace("SamplingParams ", ""), str(err).split()[1].split("=")[0]) from err

    def requests(self, body: dict, chat: bool, params: SamplingParams) -> list[GenerationRequest]:
        """The engine's requests of an HTTP request, each checked (tokens, length) before it joins."""
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise ApiError(400, "'messages' must be a non-empty list of {\"role\": str, \"content\": str} objects",
                               "messages")
            prompts = [messages]
        else:
            prompt = body.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) or (
                isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, (str, list)) for p in prompts):
                raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token ids", "prompt")
        call = next(self._ids)
        out = []
        for i, prompt in enumerate(prompts):
            for request in params.requests(prompt, f"{call}-{i}"):
                try:
                    seq = self.engine.make_sequence(request)  # what generate would refuse, refused here alone
                except (ValueError, TypeError) as err:
                    raise ApiError(400, f"prompt {i}: {err}", "messages" if chat else "prompt") from err
                if seq.prompt_len > self.max_prompt_tokens:
                    raise ApiError(400, f"prompt {i} has {seq.prompt_len} tokens, more than this server allows "
                                        f"({self.max_prompt_tokens}, --max-prompt-tokens)", "prompt")
                out.append(request)
        return out

    async def _handle(self, request: fastapi.Request, chat: bool):
        self._authorize(request)
        body = await self._body(request)
        params = self.sampling(body, chat)
        job = Job(self.requests(body, chat, params), asyncio.get_running_loop())
        index = {r.request_id: i for i, r in enumerate(job.requests)}
        self.worker.submit(job)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.requests[0].request_id}", "created": int(time.time()),
                "model": self.model_name}
        if _field(body, "stream", (bool,), False):
            usage = bool(_field(body, "stream_options", (dict,), {}).get("include_usage"))
            return StreamingResponse(self._sse(job, index, meta, chat, usage), media_type="text/event-stream")
        results: dict[int, GenerationResult] = {}
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            async for event in _events(job):
                if event.finished:
                    results[index[event.request_id]] = event.result
        except BaseException:
            job.cancelled = True
            raise
        finally:
            watcher.cancel()
        failed = [r for r in results.values() if r.finish_reason == "error"]
        if failed:
            raise ApiError(500, f"generation failed: {failed[0].error}", kind="server_error")
        choices = [_choice(i, results[i], chat, params) for i in sorted(results)]
        prompt_tokens = sum(r.prompt_tokens for r in results.values())
        completion = sum(len(r.tokens) for r in results.values())
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    async def _sse(self, job: Job, index: dict[str, int], meta: dict, chat: bool, usage: bool = False):
        """The job's events as server-sent events; usage (stream_options.include_usage): a last chunk
        with no choices and the token counts, as OpenAI sends it."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        prompt_tokens = completion_tokens = 0
        try:
            if chat:
                for i in range(len(job.requests)):
                    yield _sse_line({**meta, "object": kind, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            async for event in _events(job):
                if not event.text and not event.finished:
                    continue
                reason = FINISH[event.finish_reason] if event.finished else None
                choice = ({"index": index[event.request_id], "delta": {"content": event.text} if event.text else {},
                           "finish_reason": reason} if chat else
                          {"index": index[event.request_id], "text": event.text, "logprobs": None, "finish_reason": reason})
                yield _sse_line({**meta, "object": kind, "choices": [choice]})
                if event.finished:
                    prompt_tokens += event.result.prompt_tokens
                    completion_tokens += len(event.result.tokens)
            if usage:
                yield _sse_line({**meta, "object": kind, "choices": [], "usage": {
                    "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}})
            yield "data: [DONE]\n\n"
        except ApiError as err:
            yield _sse_line({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                       "code": err.status}})
        finally:  # the client left (or the stream ended): whatever still runs is cancelled
            job.cancelled = True


async def _cancel_on_disconnect(request: fastapi.Request, job: Job) -> None:
    """A client that leaves before its answer cancels its requests: once the body is read, the
    next ASGI message is the disconnect (a streamed response hears it through Starlette)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled = True


async def _events(job: Job):
    """A job's StreamEvents until the worker is done with it (its failure raised as ApiError)."""
    while (item := await job.events.get()) is not None:
        if isinstance(item, ApiError):
            raise item
        yield item


def _sse_line(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _choice(i: int, result: GenerationResult, chat: bool, params: SamplingParams) -> dict:
    reason = FINISH[result.finish_reason]
    logprobs = None
    if params.logprobs:
        logprobs = {"token_logprobs": result.logprobs, "tokens": result.tokens}
    if chat:
        return {"index": i, "message": {"role": "assistant", "content": result.text}, "finish_reason": reason,
                "logprobs": logprobs}
    return {"index": i, "text": result.text, "finish_reason": reason, "logprobs": logprobs}


def serve(args: argparse.Namespace, engine) -> int:
    server = Server(engine, args.served_model_name or args.model, api_key=args.api_key, max_pending=args.max_pending,
                    max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level="warning")
    finally:
        server.worker.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from runtime.cli import main as cli_main

    return cli_main(["serve", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
