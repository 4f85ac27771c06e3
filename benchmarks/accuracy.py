"""Does sparse attention keep the answers? Task accuracy of every mode at every budget.

Accuracy (training/tasks' checker: exact match, or the items of a list answer) of `dense`,
`mage`, `herald` (selection source `cpu`, `gpu-compact` and `split`) and `quest` at budgets of 1,
2, 5 and 10% of the context, at several context lengths, on held-out task instances (the test
split of training/tasks.py, which no training-time decision saw; fixed seed), every request
batched through the Engine. With --recall, the attention mass each mode's selection captures
(benchmarks/recall.py, on the first instances of each task, same split) sits beside the
accuracy. The JSON and the printed header name the split.

    python -m benchmarks.accuracy --model checkpoints/<name> --contexts 1024 2048 4096 --per-task 20 --recall
    python -m benchmarks.accuracy --model checkpoints/<name> --tasks ruler --contexts 8192 16384 32768

--tasks takes task names and groups (training/tasks.py: `ruler` is RULER's eleven synthetic tasks,
by RULER's names; list answers are graded by their items, see there).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from tqdm.auto import tqdm

from benchmarks.recall import RecallSettings, dumps, run_recall, task_prompts
from runtime.config import EngineConfig, SparseConfig
from runtime.engine import Engine
from training.evaluate import add_split_argument, add_tasks_argument, evaluate

# name -> (engine mode, selection source or None)
class ModeSpec(NamedTuple):
    mode: str
    source: str | None = None  # herald's selection source
    lookahead: bool = False  # herald: the next block's pages chosen from this block's draft
    query: str | None = None  # the selection query (None: the mode's default, SparseConfig.selection_query)
    kv_format: str = "model"  # EngineConfig.kv_format: fp8_e4m3 stores K/V as e4m3 pages with scales


MODE_SPECS: dict[str, ModeSpec] = {
    "dense": ModeSpec("dense"),
    "mage": ModeSpec("mage"),
    "herald-cpu": ModeSpec("herald", "cpu"),
    "herald-gpu-compact": ModeSpec("herald", "gpu-compact"),
    "herald-split": ModeSpec("herald", "split"),
    # the design's literal step 0: exact attention over the host store, its page scores select (herald's exact reference)
    "herald-gpu-exact": ModeSpec("herald", "gpu-exact"),
    # the configuration the throughput numbers use: its blocks after the first take the draft's pages
    "herald-lookahead": ModeSpec("herald", "gpu-compact", lookahead=True),
    # herald scoring with the block-mean query (its default before the seventh session), for comparison
    "herald-mean-query": ModeSpec("herald", "gpu-compact", query="mean"),
    "quest": ModeSpec("quest"),
    # fp8 K/V: what the format costs, dense's resident cache and herald's host store alike
    "dense-fp8": ModeSpec("dense", kv_format="fp8_e4m3"),
    "herald-fp8": ModeSpec("herald", "gpu-compact", lookahead=True, kv_format="fp8_e4m3"),
}
DEFAULT_BUDGETS = (1.0, 2.0, 5.0, 10.0)  # percent of the context
# Column labels (a task not named here is labelled by its name). vartrack is "vtr": "vt" is RULER's task.
TASK_SHORT = {"passkey": "pk", "multikey": "mk", "kv": "kv", "vartrack": "vtr", "niah_single_1": "s1",
              "niah_single_2": "s2", "niah_single_3": "s3", "niah_multikey_1": "mk1", "niah_multikey_2": "mk2",
              "niah_multikey_3": "mk3", "niah_multivalue": "mv", "niah_multiquery": "mq"}
DEFAULT_OUT = Path("benchmarks/data/accuracy.json")
DEFAULT_PLOT = Path("benchmarks/plots/accuracy.png")


def mode_dense_layers(mode: str, dense_layers: int) -> int:
    """The layers `mode` keeps exact: `dense_layers` for the sparse modes, none for dense."""
    return 0 if mode == "dense" else dense_layers


def sparse_config(spec: str, budget_percent: float | None, *, page_size: int, sink_tokens: int, local_window: int,
                  dense_layers: int, compact_bits: int, compact_group: int) -> SparseConfig:
    """The SparseConfig one (mode spec, budget) row runs with."""
    _, source, lookahead, query, _ = MODE_SPECS[spec]
    kwargs: dict[str, Any] = dict(page_size=page_size, sink_tokens=sink_tokens, local_window=local_window,
                                  dense_layers=dense_layers, compact_bits=compact_bits, compact_group=compact_group,
                                  lookahead=lookahead, query=query)
    if budget_percent is not None:
        kwargs["budget_fraction"] = budget_percent / 100.0
    if source is not None:
        kwargs["source"] = source
    return SparseConfig(**kwargs)


def recall_variant(spec: str, compact_bits: int, page_size: int) -> tuple[str, str, str] | None:
    """The recall harness row (variant, granularity, aggregate) that mirrors a mode's selection (the
    lookahead's: that of its step-0 source, which its draft selection approximates)."""
    mode, source, _, query, _ = MODE_SPECS[spec]
    gran = f"page{page_size}"
    if mode == "mage" or source == "gpu-exact" or (source == "cpu" and query == "mean"):  # exact block-mean scores
        return ("mage", gran, "max")
    if source == "cpu":  # exact scores of herald's default, one query per block position
        return ("herald-positions", gran, "max")
    if query == "mean":  # int4/int8 keys score as exact ones (RESULTS.md): mage's block-mean pages
        return ("mage", gran, "max")
    if source == "gpu-compact":  # the recall harness's compact variants take herald's default queries
        return (f"herald-int{compact_bits}", gran, "max")
    if source == "split":
        return ("herald-split", gran, "max")
    if mode == "quest":
        return ("quest", gran, "bound")
    return None


def mode_mass(recall_result: dict[str, Any], spec: str, budget_percent: float, compact_bits: int, page_size: int,
              num_layers: int, dense_layers: int) -> float | None:
    """Attention mass a mode keeps: the mean over its sparse layers (1.0 when every layer is dense)."""
    mode = MODE_SPECS[spec].mode
    if mode == "dense":
        return 1.0
    first_sparse = mode_dense_layers(mode, dense_layers)
    if first_sparse >= num_layers:
        return 1.0
    key = recall_variant(spec, compact_bits, page_size)
    label = f"{budget_percent:g}%"
    for row in recall_result["rows"]:
        if (row["variant"], row["granularity"], row["aggregate"]) == key and row["budget"] == label:
            values = [v for v in row["mass_by_layer"][first_sparse:] if v is not None]
            return sum(values) / len(values) if values else None
    return None


def run_configs(base: Engine, specs: Sequence[str], budgets: Sequence[float], contexts: Sequence[int],
                tasks: Sequence[str], per_task: int, seed: int, sparse_kwargs: dict[str, Any],
                engine_kwargs: dict[str, Any], progress: bool = True, *, split: str) -> list[dict[str, Any]]:
    """Accuracy of every (mode spec, budget) on the (split, seed) instances; dense once. One Engine
    per row, sharing the weights."""
    plan = [(s, None) if MODE_SPECS[s].mode == "dense" else (s, b) for s in specs
            for b in ([None] if MODE_SPECS[s].mode == "dense" else budgets)]
    rows = []
    for spec, budget in tqdm(plan, desc="accuracy", unit="config", disable=not progress):
        mode, source = MODE_SPECS[spec][:2]
        config = EngineConfig(model_path=base.config.model_path, mode=mode, progress=False,
                              kv_format=MODE_SPECS[spec].kv_format, sparse=sparse_config(spec, budget, **sparse_kwargs),
                              **engine_kwargs)
        engine = Engine(config, model=base.model, tokenizer=base.tokenizer)
        res = evaluate(engine, tasks, contexts, per_task, seed, split=split)
        means = list(res["mean"].values())
        rows.append({
            "spec": spec, "mode": mode, "source": source, "budget_percent": budget,
            "label": spec if budget is None else f"{spec} {budget:g}%",
            "accuracy": res["accuracy"], "mean": res["mean"], "mean_all": sum(means) / len(means),
            "correct": res["correct"], "samples": res["samples"], "wall_s": res["wall_s"],
            "tokens_per_s": res["tokens_per_s"],
        })
    return rows


def accuracy_table(result: dict[str, Any]) -> str:
    """Rows: mode/source/budget; columns per context: each task, the mean (and the mass with --recall)."""
    contexts = [str(c) for c in result["contexts"]]
    tasks = result["tasks"]
    with_mass = any(r.get("mass") for r in result["rows"])
    header = ["mode / budget"]
    for c in contexts:
        header += [f"{c}:{TASK_SHORT.get(t, t)}" for t in tasks] + [f"{c}:mean"] + ([f"{c}:mass"] if with_mass else [])
    header.append("mean")
    lines = []
    for r in result["rows"]:
        line = [r["label"]]
        for c in contexts:
            line += [f"{r['accuracy'][t][c]:.2f}" for t in tasks] + [f"{r['mean'][c]:.2f}"]
            if with_mass:
                m = (r.get("mass") or {}).get(c)
                line.append("-" if m is None else f"{m:.3f}")
        line.append(f"{r['mean_all']:.3f}")
        lines.append(line)
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]

    def fmt(x: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def plot_accuracy(result: dict[str, Any], path: Path) -> Path | None:
    """Mean accuracy against budget per mode, one panel per context (mass dotted, with --recall)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib, or pass --no-plot)", file=sys.stderr)
        return None
    contexts = [str(c) for c in result["contexts"]]
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts) + 1, 4), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    specs = list(dict.fromkeys(r["spec"] for r in result["rows"]))
    for ax, c in zip(axes[0], contexts):
        for i, spec in enumerate(specs):
            rows = sorted((r for r in result["rows"] if r["spec"] == spec), key=lambda r: r["budget_percent"] or 0)
            color = colors[i % len(colors)]
            if rows[0]["budget_percent"] is None:
                ax.axhline(rows[0]["mean"][c], color=color, ls="--", label=spec)
                continue
            x = [r["budget_percent"] for r in rows]
            ax.plot(x, [r["mean"][c] for r in rows], "o-", color=color, label=spec)
            if any(r.get("mass") for r in rows):
                ax.plot(x, [(r.get("mass") or {}).get(c) or float("nan") for r in rows], ":", color=color, alpha=0.7)
        ax.set_xscale("log")
        budgets = sorted({r["budget_percent"] for r in result["rows"] if r["budget_percent"] is not None})
        ax.set_xticks(budgets, [f"{b:g}%" for b in budgets])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("KV budget (share of the context)")
        ax.set_title(f"context {c}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact-match accuracy (dotted: attention mass)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"accuracy vs budget, {Path(result['model']).name}, {result['per_task']} per task, "
                 f"{result['device']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--per-task", type=int, default=20, help="held-out instances per task and context")
    add_tasks_argument(p)
    p.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS), help="percent of the context")
    p.add_argument("--modes", nargs="+", default=list(MODE_SPECS), choices=list(MODE_SPECS))
    add_split_argument(p)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--page-size", type=int, default=SparseConfig.page_size)
    p.add_argument("--sink-tokens", type=int, default=SparseConfig.sink_tokens)
    p.add_argument("--local-window", type=int, default=SparseConfig.local_window)
    p.add_argument("--dense-layers", type=int, default=SparseConfig.dense_layers,
                   help=f"first layers the sparse modes keep exact (default: the runtime's, {SparseConfig.dense_layers})")
    p.add_argument("--compact-bits", type=int, default=SparseConfig.compact_bits, choices=(4, 8))
    p.add_argument("--compact-group", type=int, default=SparseConfig.compact_group,
                   help="elements per scale of the compact keys (capped at the head dim)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--unmasking", default="threshold", choices=("threshold", "fixed"))
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--recall", action="store_true", help="also measure each mode's captured attention mass")
    p.add_argument("--recall-examples", type=int, default=1, help="held-out instances per task for --recall")
    p.add_argument("--recall-blocks", type=int, default=2, help="blocks recorded per instance for --recall")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(not 0.0 < b <= 100.0 for b in args.budgets):
        raise SystemExit(f"--budgets {args.budgets}: each must be a percentage in (0, 100]")
    progress = not args.no_progress
    t0 = time.perf_counter()
    engine_kwargs = dict(device=args.device, dtype=args.dtype, attention_backend=args.attention_backend,
                         unmasking=args.unmasking, max_batch_size=args.max_batch_size)
    base = Engine(EngineConfig(model_path=str(args.model), progress=False, **engine_kwargs))
    model = base.model_config
    notes = []
    group = min(args.compact_group, model.head_dim)
    if group != args.compact_group:
        notes.append(f"compact_group {args.compact_group} exceeds head_dim {model.head_dim}: using {group}")
    all_dense = sorted({s for s in args.modes if MODE_SPECS[s][0] != "dense"
                        and mode_dense_layers(MODE_SPECS[s][0], args.dense_layers) >= model.num_layers})
    if all_dense:
        notes.append(f"{all_dense} keep {mode_dense_layers('mage', args.dense_layers)} dense layers, every layer "
                     f"of this {model.num_layers}-layer model: they run exact attention (--dense-layers 0 makes "
                     "them sparse)")
    sparse_kwargs = dict(page_size=args.page_size, sink_tokens=args.sink_tokens, local_window=args.local_window,
                         dense_layers=args.dense_layers, compact_bits=args.compact_bits, compact_group=group)
    rows = run_configs(base, args.modes, args.budgets, args.contexts, args.tasks, args.per_task, args.seed,
                       sparse_kwargs, engine_kwargs, progress, split=args.split)
    result: dict[str, Any] = {
        "model": str(args.model), "device": str(base.device), "dtype": str(base.dtype).replace("torch.", ""),
        "contexts": args.contexts, "tasks": args.tasks, "per_task": args.per_task, "seed": args.seed,
        "split": args.split, "budgets_percent": args.budgets, "sparse": sparse_kwargs, "unmasking": args.unmasking,
        "block_size": base.settings.block_size, "steps": base.settings.steps, "rows": rows, "notes": notes,
    }
    if args.recall:
        variants = {recall_variant(s, args.compact_bits, args.page_size) for s in args.modes} - {None}
        settings = RecallSettings(budgets=[f"{b:g}%" for b in args.budgets], page_sizes=[args.page_size],
                                  aggregates=["max"], variants=sorted({v for v, _, _ in variants}), token_level=False,
                                  sink_tokens=args.sink_tokens, local_window=args.local_window, dense_layers=0,
                                  compact_group=group, split_bits=args.compact_bits)
        recall_engine = Engine(EngineConfig(model_path=str(args.model), mode="dense", progress=False,
                                            **(engine_kwargs | {"attention_backend": "torch"})),
                               model=base.model, tokenizer=base.tokenizer)
        result["recall"] = {}
        for c in args.contexts:
            prompts = [ids for task in args.tasks
                       for ids in task_prompts(recall_engine, task, [c], args.recall_examples, args.seed,
                                                   split=args.split)]
            rec = run_recall(recall_engine, prompts, args.recall_blocks, settings, progress=progress)
            result["recall"][str(c)] = {k: rec[k] for k in ("rows", "query_cosine", "records", "notes")}
            for row in rows:
                if row["budget_percent"] is not None or row["mode"] == "dense":
                    mass = mode_mass(rec, row["spec"], row["budget_percent"] or 100.0, args.compact_bits,
                                     args.page_size, model.num_layers, args.dense_layers)
                    row.setdefault("mass", {})[str(c)] = mass
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"{args.model}: {len(args.tasks)} task(s) x {args.per_task} instance(s) of the {args.split} split "
          f"(seed {args.seed}) per "
          f"context, {base.device} {result['dtype']}, block {result['block_size']}, {args.unmasking} unmasking, "
          f"pages of {args.page_size}, sinks {args.sink_tokens}, window {args.local_window}; {result['wall_s']} s")
    mass_note = "; mass = attention mass the mode's selection captures, mean over its sparse layers"
    print("\nexact-match accuracy (columns context:task; mean = over tasks" + (mass_note if args.recall else "") + ")")
    print(accuracy_table(result))
    if args.recall:
        print("\nMAGE property: mean cosine(block-mean query at step 0, at later steps), per layer")
        for c, rec in result["recall"].items():
            cos = ["-" if v is None else f"{v:.3f}" for v in rec["query_cosine"]["by_layer"]]
            print(f"  context {c}: " + " ".join(cos))
    for note in notes:
        print(f"note: {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(result))
    print(f"wrote {args.out}")
    if not args.no_plot:
        path = plot_accuracy(result, args.plot)
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
