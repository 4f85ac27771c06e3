"""Accuracy of a block-diffusion checkpoint on the synthetic tasks (exact match; list answers by their items).

    python -m training.evaluate --model DIR --contexts 512 1024 2048 4096 --per-task 50 --seed 1234
    python -m training.evaluate --model DIR --tasks ruler --contexts 4096 8192 16384 32768

Runs the real inference path (runtime.engine.Engine, greedy, the chosen attention mode) on
held-out examples of the test split (training/tasks.py: a stream no training-time decision saw;
`--split validation` measures the stream training selected on instead), prints a task x context
table and writes JSON, both naming the split. `evaluate(engine, ...)` is the reusable part (the
accuracy benchmark calls it with any mode, training's periodic evaluations on the validation split).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from runtime.config import ATTENTION_MODES, EngineConfig
from runtime.decoding import GenerationRequest
from runtime.engine import Engine
from training.tasks import ALL_TASKS, MIN_LENGTHS, TASK_GROUPS, TASKS, generate_examples, resolve_tasks

# The splits a command that reports numbers may draw; test unless validation is asked for by name.
REPORTED_SPLITS = ("test", "validation")


def add_split_argument(parser: argparse.ArgumentParser) -> None:
    """--split of a command that reports numbers: test by default, so no reported figure comes from
    the instances training selected on unless the command line says so (and the output names it)."""
    parser.add_argument("--split", default="test", choices=REPORTED_SPLITS,
                        help="task stream of the instances: test (no training-time decision saw it) or validation "
                             "(the one training's curriculum and model choice used; to compare with a train_summary)")


class _TaskList(argparse.Action):
    """Stores the task names given, with group names (training.tasks.TASK_GROUPS) expanded."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(resolve_tasks(values)))


def add_tasks_argument(parser: Any, flag: str = "--tasks", default: Sequence[str] = TASKS, nargs: str = "+",
                       help: str = "") -> None:
    """A task-list option of `parser` (or an argument group): task names and group names, the groups
    expanded when parsed (training.tasks.TASK_GROUPS)."""
    parser.add_argument(flag, nargs=nargs, default=list(default), choices=ALL_TASKS + tuple(TASK_GROUPS),
                        action=_TaskList, metavar="TASK",
                        help=(help + "; " if help else "") + "names of training.tasks.ALL_TASKS, or groups: "
                        f"default ({' '.join(TASKS)}), ruler (RULER's {len(TASK_GROUPS['ruler'])}: "
                        f"{' '.join(TASK_GROUPS['ruler'])}), all")


def evaluate(engine: Engine, tasks: Sequence[str], contexts: Sequence[int], per_task: int, seed: int,
             *, split: str, max_new_tokens: int | None = None, samples_per_cell: int = 1,
             deadline: float | None = None) -> dict[str, Any]:
    """Greedy accuracy per task and context on `per_task` examples each of the (split, seed) stream
    (training/tasks.py SPLITS: "validation" for training's decisions, "test" for reported numbers; no
    default, so every caller names it). An example is right when its task's checker says so
    (training.tasks.check_answer: exact match, or the items of a list answer).

    max_new_tokens: the generation limit of every request; None: each example's own room (its length
    minus its prompt: its task's ANSWER_ROOMS entry and the 0-7 offset), so prompt + generation never
    passes the context.

    Contexts run in the order given. deadline (a time.perf_counter() value): a context after the
    first is skipped when its estimated time (the previous context's, scaled by length) would end
    past it; skipped ones are listed, never silently dropped.

    Returns {"accuracy": {task: {str(context): fraction}}, "mean": {str(context): fraction},
    "correct"/"total" in the same layout, "samples": a few (prompt tail, answer, prediction),
    "contexts" (evaluated, ascending), "skipped_contexts", "tokens_per_s", "wall_s", and the arguments
    (split and seed included)}.
    """
    if per_task < 1:
        raise ValueError(f"per_task={per_task} must be >= 1")
    limit = engine.model_config.max_position_embeddings
    too_long = [c for c in contexts if c > limit]
    if too_long:
        raise ValueError(f"contexts {too_long} exceed the model's max_position_embeddings={limit}")
    too_short = sorted({(t, MIN_LENGTHS[t]) for t in tasks for c in contexts if c < MIN_LENGTHS[t]})
    if too_short:
        raise ValueError(f"contexts {sorted(contexts)} include some below what a task needs: "
                         + ", ".join(f"{t} from {n}" for t, n in too_short))
    accuracy: dict[str, dict[str, float]] = {t: {} for t in tasks}
    correct: dict[str, dict[str, int]] = {t: {} for t in tasks}
    samples: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    generated = 0
    done: list[int] = []
    skipped: list[int] = []
    last: tuple[int, float] | None = None  # (context, seconds) of the previous context
    for ctx in contexts:
        if deadline is not None and last is not None:
            estimate = last[1] * ctx / last[0]
            if time.perf_counter() + estimate > deadline:
                skipped.append(ctx)
                continue
        t_ctx = time.perf_counter()
        examples = [ex for task in tasks for ex in generate_examples(task, ctx, per_task, seed, split=split)]
        requests = [GenerationRequest(prompt=ex.prompt, request_id=str(i),
                                      max_new_tokens=max_new_tokens or ex.length - len(ex.prompt))
                    for i, ex in enumerate(examples)]
        results = engine.generate(requests)
        generated += sum(len(r.tokens) for r in results)
        for task in tasks:
            pairs = [(ex, r) for ex, r in zip(examples, results) if ex.task == task]
            hits = sum(ex.check(r.text) for ex, r in pairs)
            correct[task][str(ctx)] = hits
            accuracy[task][str(ctx)] = hits / len(pairs)
            for ex, r in pairs[:samples_per_cell]:
                samples.append({"task": task, "context": ctx, "prompt_tail": ex.prompt[-80:], "answer": ex.answer,
                                "prediction": r.text, "correct": ex.check(r.text)})
        done.append(ctx)
        last = (ctx, time.perf_counter() - t_ctx)
    wall = time.perf_counter() - t0
    done.sort()
    accuracy = {t: {str(c): accuracy[t][str(c)] for c in done} for t in tasks}
    correct = {t: {str(c): correct[t][str(c)] for c in done} for t in tasks}
    mean = {str(c): sum(accuracy[t][str(c)] for t in tasks) / len(tasks) for c in done}
    return {"accuracy": accuracy, "mean": mean, "correct": correct, "total": per_task, "tasks": list(tasks),
            "contexts": done, "skipped_contexts": skipped, "split": split, "seed": seed, "mode": engine.config.mode,
            "samples": samples, "wall_s": round(wall, 2), "tokens_per_s": round(generated / wall, 1) if wall > 0 else 0.0}


def accuracy_table(result: dict[str, Any], markdown: bool = False) -> str:
    """The task x context accuracy table of an `evaluate` result, as text or Markdown."""
    contexts = [str(c) for c in result["contexts"]]
    rows = [[task] + [f"{result['accuracy'][task][c]:.2f}" for c in contexts] for task in result["tasks"]]
    rows.append(["mean"] + [f"{result['mean'][c]:.2f}" for c in contexts])
    header = ["task \\ context"] + contexts
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    text = "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header, *rows])
    if result.get("skipped_contexts"):
        text += f"\n(not evaluated, out of time: contexts {result['skipped_contexts']})"
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--per-task", type=int, default=50)
    add_split_argument(p)
    p.add_argument("--seed", type=int, default=1234)
    add_tasks_argument(p)
    p.add_argument("--mode", default="dense", choices=ATTENTION_MODES)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--json-out", type=Path, default=None, help="default: <model>/eval_<mode>.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    engine = Engine(EngineConfig(model_path=args.model, mode=args.mode, device=args.device, dtype=args.dtype,
                                 attention_backend=args.attention_backend, max_batch_size=args.max_batch_size,
                                 progress=False))
    result = evaluate(engine, args.tasks, args.contexts, args.per_task, args.seed, split=args.split)
    result.update(model=str(args.model), device=str(engine.device), dtype=str(engine.dtype))
    print(f"{args.model}: mode {args.mode}, {engine.device}, {engine.dtype}, {args.per_task} per task, "
          f"{args.split} split, seed {args.seed}, {result['wall_s']} s")
    print(accuracy_table(result))
    out = args.json_out or Path(args.model) / f"eval_{args.mode}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
