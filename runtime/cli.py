"""Command line: `dllm generate` for real prompts, `dllm demo` for a first look on the bundled model."""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path

from runtime.config import (ATTENTION_MODES, DECODING_RULES, KV_FORMATS, SELECTION_SOURCES, UNMASKING_SCHEDULES, EngineConfig,
                            SparseConfig)
from runtime.decoding import GenerationRequest, GenerationResult
from runtime.engine import DEFAULT_MODEL, Engine, refused_result
from runtime.parallel import shutdown
from runtime.sampling import SamplingParams

DEMO_PROMPTS = [
    "The key to the vault is",
    "Once upon a time",
    "def add(a, b):\n    return",
]


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="local Hugging Face model directory")
    parser.add_argument("--mode", default="dense", choices=ATTENTION_MODES)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16, float64")
    parser.add_argument("--kv-format", default="model", choices=KV_FORMATS,
                        help="how K/V are stored: the model's dtype, or fp8_e4m3 (e4m3 pages with per-page, "
                             "per-head scales: half the bytes; dense and herald)")
    decoding = parser.add_argument_group("decoding (default: the checkpoint's, else its family's)")
    decoding.add_argument("--block-size", type=int, default=None)
    decoding.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: block size)")
    decoding.add_argument("--unmasking", default=None, choices=UNMASKING_SCHEDULES)
    decoding.add_argument("--threshold", type=float, default=None, help="confidence threshold for threshold unmasking")
    decoding.add_argument("--decoding", default=None, choices=DECODING_RULES,
                          help="decoding rule: sdar, or fast_dllm_v2 (token shift, sub-blocks left to right)")
    decoding.add_argument("--sub-block-size", type=int, default=None, help="fast_dllm_v2: sub-block size")
    decoding.add_argument("--mask-token-id", type=int, default=None)
    decoding.add_argument("--stop-token-id", type=int, action="append", default=None,
                          help="a token that ends generation (repeat; default: every eos the checkpoint names)")
    decoding.add_argument("--chat-template", default=None, help="a .jinja chat template instead of the checkpoint's")
    decoding.add_argument("--parse-special-tokens", action="store_true",
                          help="read special tokens' text in prompts (e.g. <|im_end|>) as control tokens; by default "
                               "it stays plain text (the mask token is refused either way)")
    decoding.add_argument("--keep-special-tokens", action="store_true",
                          help="keep special tokens in the generated text (default: left out)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--tensor-parallel-size", type=int, default=None,
                        help="ranks the model is split over (default: every process of a torchrun launch, else 1); "
                             "launch: torchrun --nproc-per-node N -m runtime generate ...")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    sparse = parser.add_argument_group("sparse modes (mage, quest, herald)")
    sparse.add_argument("--budget", type=float, default=0.05, help="share of the context each block attends to")
    sparse.add_argument("--budget-tokens", type=int, default=None, help="a fixed token budget instead of --budget")
    sparse.add_argument("--page-size", type=int, default=16)
    sparse.add_argument("--source", default="gpu-compact", choices=SELECTION_SOURCES,
                        help="herald's selection source")
    sparse.add_argument("--dense-layers", type=int, default=SparseConfig.dense_layers,
                        help="first layers the sparse modes keep exact")
    sparse.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None,
                        help="herald: select and fetch each next block's pages during this block, from its draft "
                             "(HERALD's overlap; default: on with CUDA, off on the CPU, where it runs in line)")


def _config(args: argparse.Namespace, mode: str | None = None) -> EngineConfig:
    sparse = SparseConfig(budget_fraction=args.budget, budget_tokens=args.budget_tokens, page_size=args.page_size,
                          source=args.source, dense_layers=args.dense_layers, lookahead=args.lookahead)
    return EngineConfig(
        model_path=args.model, mode=mode or args.mode, device=args.device, dtype=args.dtype,
        block_size=args.block_size, denoising_steps=args.steps, unmasking=args.unmasking,
        confidence_threshold=args.threshold, decoding=args.decoding, sub_block_size=args.sub_block_size,
        mask_token_id=args.mask_token_id,
        stop_token_ids=tuple(args.stop_token_id) if args.stop_token_id is not None else None,
        chat_template=args.chat_template, parse_special_tokens=args.parse_special_tokens,
        skip_special_tokens=not args.keep_special_tokens, max_batch_size=args.max_batch_size,
        progress=not args.no_progress, sparse=sparse, tensor_parallel_size=args.tensor_parallel_size,
        kv_format=args.kv_format,
    )


def _make_engine(args: argparse.Namespace) -> Engine:
    return Engine(_config(args))


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt texts, then the lines of --prompts-file (`-`: stdin), blank lines kept: a prompt's
    id is its index, so a file's ids follow its lines."""
    prompts = list(args.prompt)
    if args.prompts_file:
        text = sys.stdin.read() if args.prompts_file == "-" else Path(args.prompts_file).read_text()
        prompts += text.splitlines()
    return prompts


def blank_result(request_id: str) -> GenerationResult:
    """A blank prompt line's result: an error for that line alone."""
    return refused_result(request_id, ValueError("the prompt is blank: write text on the line (or remove it)"))


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM stops generate as Ctrl-C does (it then returns what it has) while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_jsonl(args: argparse.Namespace) -> tuple[list[GenerationRequest | None], dict[int, GenerationResult]]:
    """--jsonl's lines as requests: one JSON object a line, with `prompt` (text or chat messages) or
    `prompt_token_ids`, an optional `id`, and SamplingParams fields (max_new_tokens, temperature,
    seed, stop, ...; the command's flags are the defaults). Returns the requests by line (None for
    a bad line) and each bad line's error result: a bad line fails alone."""
    text = sys.stdin.read() if args.jsonl == "-" else Path(args.jsonl).read_text()
    defaults = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    skip_special_tokens=not args.keep_special_tokens)
    requests: list[GenerationRequest | None] = []
    bad: dict[int, GenerationResult] = {}
    seen: set[str] = set()
    for i, line in enumerate(text.splitlines()):
        request_id = str(i)
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError(f"a line must be a JSON object, not {type(item).__name__}")
            request_id = str(item.pop("id", i))
            if request_id in seen:
                raise ValueError(f"id {request_id!r} is given to an earlier line too: ids must be unique")
            if ("prompt" in item) == ("prompt_token_ids" in item):
                raise ValueError("give exactly one of 'prompt' (text or chat messages) and 'prompt_token_ids'")
            prompt = item.pop("prompt") if "prompt" in item else item.pop("prompt_token_ids")
            params = SamplingParams.from_dict({"seed": args.seed + i, **defaults, **item})
            if params.n != 1:
                raise ValueError(f"n={params.n}: one output line per input line; repeat the line with other seeds")
            [request] = params.requests(prompt, request_id)
        except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
            requests.append(None)
            bad[i] = refused_result(request_id, ValueError(f"line {i + 1}: {err}"))
            continue
        seen.add(request_id)
        requests.append(request)
    return requests, bad


def cmd_generate(args: argparse.Namespace) -> int:
    if args.jsonl:
        return generate_jsonl(args)
    prompts = read_prompts(args)
    if not prompts:
        print("error: give --prompt TEXT (repeatable), --prompts-file FILE or --jsonl FILE (- for stdin)",
              file=sys.stderr)
        return 2
    engine = _make_engine(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    requests = [GenerationRequest(prompt=[*system, {"role": "user", "content": p}] if args.chat else p,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  seed=args.seed + i, request_id=str(i)) for i, p in enumerate(prompts) if p.strip()]
    with sigterm_interrupts():
        ran = engine.generate(requests) if requests else []
    if engine.tp.rank != 0:  # every rank of a tensor-parallel launch has the same results: rank 0 prints them
        return 0
    by_id = {r.request_id: r for r in ran}
    results = [by_id.get(str(i)) or blank_result(str(i)) for i in range(len(prompts))]
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    for prompt, result in zip(prompts, results):
        if args.json:
            print(json.dumps({"prompt": prompt, **result.__dict__}))
        else:
            print(f"--- [{result.request_id}] {result.finish_reason}, {len(result.tokens)} tokens, "
                  f"{result.latency_s:.2f} s{': ' + result.error if result.error else ''}\n"
                  f"{prompt}{bold}{result.text}{plain}")
        if result.error:  # also on stderr, for a stdout piped elsewhere
            print(f"error: request {result.request_id}: {result.error}", file=sys.stderr)
    return _exit_code(args, engine, ran, results)


def generate_jsonl(args: argparse.Namespace) -> int:
    """--jsonl IN: a request a line in, a result a line out (--output, `-`: stdout), in line order."""
    requests, bad = read_jsonl(args)
    if not requests:
        print(f"error: {args.jsonl} has no lines: write one JSON object a line", file=sys.stderr)
        return 2
    engine = _make_engine(args)
    with sigterm_interrupts():
        ran = engine.generate([r for r in requests if r is not None]) if len(bad) < len(requests) else []
    if engine.tp.rank != 0:
        return 0
    by_id = {r.request_id: r for r in ran}
    results = [bad[i] if r is None else by_id[r.request_id] for i, r in enumerate(requests)]
    with contextlib.ExitStack() as stack:
        out = sys.stdout if args.output == "-" else stack.enter_context(open(args.output, "w"))
        for i, result in enumerate(results):
            out.write(json.dumps({"line": i + 1, **result.__dict__}) + "\n")
            if result.error:
                print(f"error: request {result.request_id}: {result.error}", file=sys.stderr)
    return _exit_code(args, engine, ran, results)


def _exit_code(args: argparse.Namespace, engine: Engine, ran, results: list[GenerationResult]) -> int:
    """The summary on stderr, and the exit code: 130 interrupted, 1 if any request failed, else 0."""
    stats = engine.last_stats
    print(f"{stats.requests} requests, {stats.generated_tokens} tokens in {stats.wall_s:.2f} s "
          f"({stats.tokens_per_s:.1f} tokens/s, mode {args.mode}, device {engine.device})", file=sys.stderr)
    if getattr(ran, "stats", None) is not None and ran.stats.interrupted:
        print("interrupted: the unfinished requests are written as cancelled", file=sys.stderr)
        return 130
    failed = sum(r.finish_reason == "error" for r in results)
    if failed:
        print(f"{failed} of {len(results)} requests failed", file=sys.stderr)
        return 1
    return 0


def _retrieval_demo(args: argparse.Namespace, examples: list[dict]) -> int:
    """A trained checkpoint's long-context retrieval prompts, answered by herald and by dense."""
    t0 = time.perf_counter()
    dense = _make_engine(argparse.Namespace(**{**vars(args), "mode": "dense"}))
    herald = Engine(_config(args, "herald"), model=dense.model, tokenizer=dense.tokenizer)
    prompts = [ex["prompt"] for ex in examples]
    print(f"model {args.model} on {dense.device}: {len(prompts)} long-context retrieval prompts "
          f"({', '.join(str(len(dense.tokenizer.encode(p))) for p in prompts)} tokens); herald keeps "
          f"{100 * args.budget:.0f}% of the context per block ({args.source} selection), dense keeps all of it")
    answers = {}
    for name, engine in (("herald", herald), ("dense", dense)):
        answers[name] = engine.generate(prompts, max_new_tokens=args.max_new_tokens, seed=args.seed)
        print(f"{name}: {engine.last_stats.generated_tokens} tokens in {engine.last_stats.wall_s:.2f} s")
    for ex, h, d in zip(examples, answers["herald"], answers["dense"]):
        question = ex["prompt"][-120:].replace("\n", " ")
        print(f"\n> ...{question!r}\n  expected: {ex.get('answer')!r}\n  herald:   {h.text.strip()!r}\n"
              f"  dense:    {d.text.strip()!r}")
    print(f"\ndemo wall time {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    examples_file = Path(args.model) / "demo_prompts.json"
    if examples_file.is_file() and args.mode == "dense":
        return _retrieval_demo(args, json.loads(examples_file.read_text()))
    t0 = time.perf_counter()
    engine = _make_engine(args)
    print(f"model {args.model} ({engine.model_config.architecture}, {engine.model_config.num_layers} layers) "
          f"on {engine.device}, {engine.dtype}; block {engine.settings.block_size}, {engine.settings.steps} steps, "
          f"{engine.settings.unmasking} unmasking; mode {args.mode}")
    results = engine.generate(DEMO_PROMPTS, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              seed=args.seed)
    for prompt, result in zip(DEMO_PROMPTS, results):
        print(f"\n> {prompt!r}\n  -> {result.text!r}\n  ({len(result.tokens)} tokens, {result.blocks} blocks, "
              f"{result.denoising_passes} denoising passes, {result.finish_reason})")
    stats = engine.last_stats
    print(f"\n{stats.requests} requests batched, {stats.generated_tokens} tokens in {stats.wall_s:.2f} s "
          f"({stats.tokens_per_s:.1f} tokens/s); demo wall time {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from runtime.server import serve
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return serve(args, _make_engine(args))


def _server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 calls")
    parser.add_argument("--max-pending", type=int, default=64, help="requests waiting or running before 503")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's positions")
    parser.add_argument("--max-tokens", type=int, default=4096, help="the largest max_tokens a request may ask")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="continue prompts with a block-diffusion model")
    _engine_args(gen)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    gen.add_argument("--prompts-file", help="one prompt per line (- reads stdin); a blank line is an error for "
                                           "that line alone, so ids follow the lines")
    gen.add_argument("--json", action="store_true", help="one JSON object per result")
    gen.add_argument("--jsonl", metavar="FILE",
                     help="requests as JSON lines (- reads stdin): each an object with 'prompt' (text or chat "
                          "messages) or 'prompt_token_ids', an optional 'id', and SamplingParams fields "
                          "(max_new_tokens, temperature, seed, stop, ...; the flags are the defaults); the results "
                          "go out as JSON lines in line order, a bad line failing alone")
    gen.add_argument("--output", default="-", help="--jsonl: where the result lines go (default -: stdout)")
    gen.add_argument("--chat", action="store_true",
                     help="each prompt is a user message, rendered with the checkpoint's chat template")
    gen.add_argument("--system", default=None, help="--chat: a system message before each prompt")
    gen.set_defaults(func=cmd_generate)
    demo = sub.add_parser("demo", help="a batch of prompts on the bundled default model")
    _engine_args(demo)
    demo.set_defaults(func=cmd_demo, max_new_tokens=32)
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the server extra)")
    _engine_args(serve)
    _server_args(serve)
    serve.set_defaults(func=cmd_serve, no_progress=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown()  # a torchrun launch's process group


if __name__ == "__main__":
    sys.exit(main())
