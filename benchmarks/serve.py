"""What does serving over HTTP cost, and how do concurrent streaming clients fare? (the
OpenAI-compatible server, `runtime/server.py`, with its continuous batching)

Starts `python -m runtime.server` on a free loopback port (a process of its own, as deployed) and
sends it --requests requests from --clients concurrent streaming clients (the official `openai`
client, async). Each request is a retrieval prompt of --context tokens (training/tasks.py's test
split) asking --max-new-tokens tokens greedily with eos ignored, so that every request generates
the same count. Per request: the time to its first streamed block and the gaps between its streamed chunks (one a
block commit that adds text; the per-block latency a client sees).
Then the engine's offline `generate` runs the same prompts in this process with the same settings,
and the ratio of the two is what the server costs. One warm-up request on each side first. Bounded:
--requests requests, --timeout seconds, loopback only; the server is stopped at the end.

    python -m benchmarks.serve --model checkpoints/retrieval-6m --mode herald --context 1024 \\
        --clients 4 --requests 16 --json benchmarks/data/serve_cpu.json

Prints a table last; --json writes the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from runtime.config import ATTENTION_MODES, EngineConfig, SparseConfig
from runtime.engine import DEFAULT_MODEL, Engine
from runtime.sampling import SamplingParams
from training.tasks import TASKS, example_rng, make_example

ROOT = Path(__file__).resolve().parent.parent


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 of values (None for each when there are none)."""
    if not values:
        return dict(p50=None, p90=None, p99=None)
    p50, p90, p99 = np.percentile(np.asarray(values, dtype=float), [50, 90, 99])
    return dict(p50=float(p50), p90=float(p90), p99=float(p99))


def make_prompts(context: int, count: int, seed: int) -> list[str]:
    """count retrieval prompts that, with their answers, fit `context` tokens (the tasks in turn)."""
    out = []
    for i in range(count):
        task = TASKS[i % len(TASKS)]
        out.append(make_example(task, context, example_rng("test", seed, task, context, i)).prompt)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    """The server as `dllm serve` runs it, on loopback; returns once /health answers."""
    cmd = [sys.executable, "-m", "runtime.server", "--model", args.model, "--mode", args.mode, "--device", args.device,
           "--dtype", args.dtype, "--port", str(port), "--served-model-name", "bench",
           "--max-batch-size", str(args.max_batch_size), "--max-prompt-tokens", str(args.context),
           "--max-tokens", str(args.max_new_tokens), "--max-pending", str(max(64, 2 * args.clients)),
           "--budget", str(args.budget)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {proc.communicate()[0][-2000:]}")
        time.sleep(0.2)


async def one_request(client, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: when its blocks arrived, how many tokens, how it ended."""
    t0 = time.perf_counter()
    arrivals, tokens, reason = [], None, None
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            if chunk.choices[0].text:
                arrivals.append(now)
            reason = chunk.choices[0].finish_reason or reason
        elif chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    if not arrivals or tokens is None:
        raise RuntimeError(f"the stream ended without text or usage (finish_reason {reason})")
    return dict(start=t0, end=end, first_block_s=arrivals[0] - t0, block_gaps_s=list(np.diff(arrivals)),
                chunks=len(arrivals), tokens=tokens, finish_reason=reason)


async def drive(base_url: str, prompts: list[str], args: argparse.Namespace) -> tuple[list[dict], list[str], float]:
    """--clients concurrent clients working through the prompts; (results, errors, wall seconds)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=args.timeout)
    await one_request(client, prompts[0], min(args.max_new_tokens, 4))  # warm-up, off the clock
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results, errors = [], []

    async def worker() -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            try:
                results.append(await one_request(client, prompt, args.max_new_tokens))
            except Exception as err:  # counted and reported: a benchmark with errors is not a clean run
                errors.append(f"{type(err).__name__}: {err}")

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.clients))), args.timeout)
    wall = time.perf_counter() - t0
    await client.close()
    return results, errors, wall


def server_figures(results: list[dict], errors: list[str], wall: float, requests: int) -> dict:
    tokens = sum(r["tokens"] for r in results)
    return dict(requests=requests, completed=len(results), errors=len(errors), error_messages=errors[:5],
                wall_s=wall, requests_per_s=len(results) / wall, tokens=tokens, tokens_per_s=tokens / wall,
                first_block_ms=percentiles([1e3 * r["first_block_s"] for r in results]),
                block_ms=percentiles([1e3 * g for r in results for g in r["block_gaps_s"]]),
                chunks=sum(r["chunks"] for r in results),
                finish_reasons=sorted({str(r["finish_reason"]) for r in results}))


def offline_figures(args: argparse.Namespace, prompts: list[str]) -> dict:
    """The engine's own generate on the same prompts and settings, with per-request block times
    from its commit events."""
    engine = Engine(EngineConfig(model_path=args.model, mode=args.mode, device=args.device, dtype=args.dtype,
                                 max_batch_size=args.max_batch_size, progress=False,
                                 sparse=SparseConfig(budget_fraction=args.budget)))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    engine.generate(prompts[:1], sampling_params=SamplingParams(max_new_tokens=min(args.max_new_tokens, 4),
                                                                ignore_eos=True))  # warm-up
    commits: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    results = engine.generate(prompts, sampling_params=params,
                              on_commit=lambda e: commits.setdefault(e.request_id, []).append(time.perf_counter()))
    wall = time.perf_counter() - t0
    tokens = sum(len(r.tokens) for r in results)
    gaps = [1e3 * g for times in commits.values() for g in np.diff(times)]
    return dict(requests=len(prompts), completed=sum(r.finish_reason == "length" for r in results),
                errors=sum(r.finish_reason == "error" for r in results), wall_s=wall,
                requests_per_s=len(prompts) / wall, tokens=tokens, tokens_per_s=tokens / wall,
                # from the call's start: a prompt beyond the batch waits for a slot, as a server's request
                # waits for a free client
                first_block_ms=percentiles([1e3 * (times[0] - t0) for times in commits.values()]),
                block_ms=percentiles(gaps), device=str(engine.device))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--mode", default="dense", choices=ATTENTION_MODES)
    parser.add_argument("--budget", type=float, default=0.05, help="sparse modes: share of the context per block")
    parser.add_argument("--context", type=int, default=1024, help="tokens of prompt + answer per request")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=16, help="requests in all")
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: --clients")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the server and of the offline run (default: torch's, which "
                             "OMP_NUM_THREADS sets for both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600, help="seconds the clients may take in all")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    args.max_batch_size = args.max_batch_size or args.clients
    for name in ("clients", "requests", "max_new_tokens", "max_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv)
    finally:  # main() is called from tests too: leave the process as it was
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    prompts = make_prompts(args.context, args.requests, args.seed)
    port = free_port()
    proc = start_server(args, port)
    try:
        results, errors, wall = asyncio.run(drive(f"http://127.0.0.1:{port}", prompts, args))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    server = server_figures(results, errors, wall, args.requests)
    offline = offline_figures(args, prompts)
    ratio = server["tokens_per_s"] / offline["tokens_per_s"] if offline["tokens_per_s"] else None
    device = offline.pop("device")
    model = Path(args.model).resolve()
    meta = dict(model=str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model), mode=args.mode,
                budget=args.budget if args.mode != "dense" else None,
                context=args.context, max_new_tokens=args.max_new_tokens, clients=args.clients,
                requests=args.requests, max_batch_size=args.max_batch_size, device=device,
                gpu=torch.cuda.get_device_name() if device.startswith("cuda") else None, cpu_count=os.cpu_count(),
                torch=torch.__version__, torch_threads=torch.get_num_threads(), date=datetime.date.today().isoformat(),
                command=" ".join(["python -m benchmarks.serve", *(sys.argv[1:] if argv is None else argv)]))
    data = dict(meta=meta, server=server, offline=offline, server_over_offline_tokens_per_s=ratio)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1))

    def ms(p: dict) -> str:
        return "/".join("-" if p[k] is None else f"{p[k]:.0f}" for k in ("p50", "p90", "p99"))

    print(f"\nserve: {args.requests} requests from {args.clients} streaming clients, {Path(args.model).name} "
          f"{args.mode}, context {args.context}, {args.max_new_tokens} new tokens, batch {args.max_batch_size}, "
          f"{device}")
    print(f"{'':>16} {'done':>5} {'errors':>6} {'requests/s':>10} {'tokens/s':>9} {'first block ms p50/90/99':>25} "
          f"{'per block ms p50/90/99':>23}")
    for name, f in (("server (HTTP)", server), ("offline generate", offline)):
        print(f"{name:>16} {f['completed']:>5} {f['errors']:>6} {f['requests_per_s']:>10.2f} {f['tokens_per_s']:>9.1f} "
              f"{ms(f['first_block_ms']):>25} {ms(f['block_ms']):>23}")
    print(f"server tokens/s over offline: {ratio:.3f}" if ratio else "server tokens/s over offline: -")
    return 0 if not errors and server["completed"] == args.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
