"""Named training recipes, and the side-by-side comparison of several trained at once.

    python -m training.variants list                       # the recipes, what each changes and why
    python -m training.variants args NAME                  # its extra training.train arguments
    python -m training.variants summarize WORK_DIR [--pack-to DIR] [--variants NAME ...]

A variant is a list of training.train arguments given after scripts/train_gpu.sh's recipe (later
flags win), so `baseline` (no arguments) is the shipped recipe. scripts/train_variants.sh trains
several into WORK_DIR/<name>/ (ckpt/, train.log, train_summary.json) at the same time, then calls
`summarize`: a table of each variant's accuracy at the trained length, every variant's full
task x context table, and the best by mean accuracy at the trained length (ties: the higher
worst task), in WORK_DIR/variants_summary.{json,md}. The accuracies are each run's final
evaluation, on the validation split (training/tasks.py): choosing a recipe is a training-time
decision, so its numbers are not the ones to report; measure the chosen checkpoint on the test
split with `python -m training.evaluate` for that. `--pack-to` also writes each variant's
folder as one tar (<name>.tar, cut into 15 MiB parts when larger) beside a copy of the summary, for
transfers that take few files of a bounded size; `unpack PACKED NAME DEST` puts it back together.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGET = 0.95  # the accuracy every task should reach at the trained length
PART_BYTES = 15 * 2**20  # packed variants are cut into parts of this size: the device's transfer takes 16 MiB a file


@dataclass(frozen=True)
class Variant:
    name: str
    changes: str  # what it changes against the shipped recipe, and why
    args: tuple[str, ...]


# Levels of the hop recipes (7): passkey@128, all@128 with vartrack chains of 1-2 names, all@128,
# 256, 512, 1024, 2048. Shares: the warm-ups and 128 get the skills (16x more examples per step
# than at 2048); the pass-key warm-up gets 2 (it leaves by evaluation once learnt, ~50 s alone on an
# H100, longer on a shared GPU; mixing all tasks before it is learnt stalls); the middle contexts
# adapt positions quickly; the trained length gets a third or more.
_HOPS = ("--vartrack-any-query", "0.5", "--vartrack-warmup-chain", "1", "2")
_DEEP = ("--layers", "8")
# The long-context model's architecture and data (every ruler-* stage: --init-from needs the same shapes)
_LONG = ("--layers", "8", "--hidden", "512", "--heads", "8", "--kv-heads", "4", "--head-dim", "64", "--intermediate",
         "1024", "--rope-theta", "500000", "--tasks", "ruler", "--tokens-per-batch", "32768", "--eval-per-task", "16",
         "--advance-on", "mean")

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("baseline", "scripts/train_gpu.sh's recipe unchanged (6 layers, hidden 256, the even time floor); a "
            "reference under the same sharing of the device", ()),
    Variant("hops", "vartrack taught one lookup at a time: half its questions ask a random name of either chain (0, "
            "1 or 2 indirections; the shipped model answers even direct lookups only about half the time, so it "
            "never learnt name -> number), and a level of 1-2 name chains at 128 tokens precedes the full task; "
            "time shares 2/2/2/1/1/1.5/4.5 over the 7 levels (a third of training at the trained length, where kv's "
            "long-range digit copying was still improving when the shipped run ended); 6 layers as shipped",
            _HOPS + ("--level-shares", "2", "2", "2", "1", "1", "1.5", "4.5")),
    Variant("hops-deep", "hops with 8 layers (6.3M parameters, 12.1 MiB in bf16): a 3-name chain resolved in the "
            "prompt needs a layer per indirection on top of name assembly, lookup and copying",
            _HOPS + ("--level-shares", "2", "2", "2", "1", "1", "1.5", "4.5") + _DEEP),
    Variant("hops-deep-long", "hops-deep leaving a level when the mean over its tasks reaches 0.9 (vartrack alone "
            "no longer holds every context back) with time shares 2/1.5/1.5/0.5/0.5/1/6 (~45% of training at the "
            "trained length, for kv's digit copying there)",
            _HOPS + ("--advance-on", "mean", "--level-shares", "2", "1.5", "1.5", "0.5", "0.5", "1", "6") + _DEEP),
    Variant("hops-deep-8k", "hops-deep trained to 8192 tokens (9 levels, shares 2/2/2/1/1/1/1/1.5/4): at 2048 a 5% "
            "budget is 6-7 scored pages and herald's sparse step 0 loses kv (RESULTS.md, third session), at 8192 it "
            "is 25; the sparse modes' accuracy target needs a model that reads that far. Its --max-context "
            "overrides the script's MAX_CONTEXT (later flags win)",
            _HOPS + ("--max-context", "8192", "--level-shares", "2", "2", "2", "1", "1", "1", "1", "1.5", "4") + _DEEP),
    Variant("hops-deep-8k-continue", "hops-deep-8k's long levels only (2048/4096/8192, shares 1/2/5, lr 1e-3), to "
            "continue a checkpoint of it in a second device call: give it `-- --init-from DIR` (without it, a "
            "random model would start at 2048 with every task, what the curriculum exists to avoid). The first "
            "call spent only 115 s at 8192 "
            "(RESULTS.md, fourth session)",
            ("--vartrack-any-query", "0.5", "--max-context", "8192", "--min-context", "2048", "--warmup-tasks",
             "--level-shares", "1", "2", "5", "--lr", "1e-3") + _DEEP),
    Variant("chain", "stage 1 of the shipped checkpoints/retrieval-6m (stage 2: chain-continue). 8 layers, "
            "trained on vartrack's worked answers (training/tasks.py: `RTE = MPL = QXJ = 48213`, "
            "each step a cloze lookup, the skill kv teaches too; the recipes above trained a bare number and stayed at "
            "0.33-0.59), half the questions about any name (0-2 steps); time shares 2/2/1/1/1.5/3.5 over the 6 levels "
            "(a third at the trained length, where kv was still rising when the 4.75M model's run ended)",
            ("--vartrack-any-query", "0.5", "--level-shares", "2", "2", "1", "1", "1.5", "3.5") + _DEEP),
    Variant("chain-wide", "chain with 4x the tokens per step (65,536; up to 512 rows): the shipped run supervised about "
            "250 answer positions per step at 2048 tokens (8 rows), and a 6-8 layer model leaves the GPU mostly idle, "
            "so a wider step should cost far less than 4x its time. It did not: steps took 3.3x longer, the run made 2,388 "
            "steps and ended at 0.30 (RESULTS.md, sixth session)",
            ("--vartrack-any-query", "0.5", "--level-shares", "2", "2", "1", "1", "1.5", "3.5", "--tokens-per-batch",
             "65536", "--max-batch", "512") + _DEEP),
    Variant("chain-continue", "chain's last two levels (1024, 2048 tokens; shares 1/5, lr 7e-4) to continue a checkpoint "
            "of it in a second device call: give it `-- --init-from DIR`. chain ended with kv at 0.81 at 2048 tokens, "
            "still rising (0.34 -> 0.81 in its last 150 s), its misses digits miscopied from the right key",
            ("--vartrack-any-query", "0.5", "--min-context", "1024", "--warmup-tasks", "--level-shares", "1", "5",
             "--lr", "7e-4") + _DEEP),
    Variant("chain-8k-continue", "chain-continue taken on to 4096 and 8192 tokens (shares 1/3, lr 7e-4; give it `-- "
            "--init-from DIR`): at 2048 tokens a 5% budget is 6 scored pages and herald needs 10-20% to match dense "
            "(RESULTS.md, sixth session); at 8192, 5% is 26 pages, the absolute budget that matched dense at 2048",
            ("--vartrack-any-query", "0.5", "--max-context", "8192", "--min-context", "4096", "--warmup-tasks",
             "--level-shares", "1", "3", "--lr", "7e-4", "--final-contexts", "8192", "4096", "2048",
             "--final-per-task", "32") + _DEEP),
    Variant("ruler-4k", "stage 1 of the long-context model (issue 32, checkpoints/retrieval-long): 18.9M "
            "parameters (8 layers, hidden 512, 8/4 heads of 64, MLP 1024; 37.8 MB in bf16, so the checkpoint "
            "and the repo together still travel to the device), RoPE theta 500000 (the slowest wavelength, ~2M "
            "positions, leaves room for 32K+ without rescaling), RULER's 11 tasks, a niah_single_1 warm-up at 512 "
            "then 512, 1024, 2048, 4096 (shares 1.5/3/1.5/1.5/2.5), 32K tokens per step, lr 1.5e-3",
            _LONG + ("--max-context", "4096", "--min-context", "512", "--warmup-tasks", "niah_single_1",
                     "--level-shares", "1.5", "3", "1.5", "1.5", "2.5", "--lr", "1.5e-3",
                     "--final-contexts", "4096", "2048", "8192")),
    Variant("ruler-16k-continue", "stage 2: ruler-4k's checkpoint (`-- --init-from DIR`) taken from 4096 to 8192 "
            "and 16384 tokens (shares 1/2/3; lr 7e-4), flex attention for the long rows",
            _LONG + ("--max-context", "16384", "--min-context", "4096", "--warmup-tasks", "--level-shares", "1", "2",
                     "3", "--lr", "7e-4", "--final-contexts", "16384", "8192", "4096", "--final-per-task", "16")),
    Variant("ruler-32k-continue", "stage 3: on to 32768 tokens (16384/32768, shares 1/3, lr 5e-4; `-- --init-from "
            "DIR`)",
            _LONG + ("--max-context", "32768", "--min-context", "16384", "--warmup-tasks", "--level-shares", "1", "3",
                     "--lr", "5e-4", "--final-contexts", "32768", "16384", "--final-per-task", "16")),
)}
DEFAULT_VARIANTS = ("chain",)


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"variant {name!r} is unknown; choose from {sorted(VARIANTS)}")
    return VARIANTS[name]


# ----------------------------------------------------------------------------- comparison

def trained_length(summary: dict[str, Any]) -> int:
    """The longest context of the run's curriculum (its last level)."""
    return int(summary["levels"][-1]["context"])


def variant_result(name: str, folder: Path) -> dict[str, Any]:
    """One variant's outcome from WORK_DIR/<name>/train_summary.json (or why there is none)."""
    path = folder / "train_summary.json"
    info: dict[str, Any] = {"name": name, "changes": VARIANTS[name].changes if name in VARIANTS else None,
                            "args": list(VARIANTS[name].args) if name in VARIANTS else None,
                            "checkpoint": str(folder / "ckpt")}
    if not path.exists():
        info["status"] = f"no train_summary.json: the run failed before its first snapshot (see {folder}/train.log)"
        return info
    summary = json.loads(path.read_text())
    trained = trained_length(summary)
    info.update(trained_length=trained, steps=summary["steps"], examples=summary["examples"], params=summary["params"],
                train_wall_s=summary["train_wall_s"], finished=summary["finished"],
                level_history=summary["level_history"], last_quick_eval=summary.get("last_quick_eval"))
    if not summary.get("contexts"):
        info["status"] = "no final evaluation (killed or failed; the checkpoint is the last snapshot)"
        return info
    # The trained length, or (when --final-contexts left it out) the longest context evaluated, said so.
    length = trained if trained in summary["contexts"] else max(summary["contexts"])
    at_length = {task: cells[str(length)] for task, cells in summary["accuracy"].items()}
    status = "finished" if summary["finished"] else "final evaluation without the last save"
    if length != trained:
        status += f"; compared at {length} tokens, the trained {trained} was not evaluated"
    info.update(status=status, compared_at=length, accuracy_at_length=at_length, mean_at_length=summary["mean"][str(length)],
                min_at_length=min(at_length.values()), reaches_target=min(at_length.values()) >= TARGET,
                accuracy=summary["accuracy"], mean=summary["mean"], table=summary.get("table"))
    return info


def compare(work: Path, names: list[str] | None = None) -> dict[str, Any]:
    """All variants' outcomes in `work` (those named, or every subfolder with a train.log) and the best."""
    if names is None:
        names = sorted(p.name for p in work.iterdir() if p.is_dir() and (p / "train.log").exists())
    if not names:
        raise ValueError(f"{work} holds no variant folders (<name>/train.log); train some with "
                         "scripts/train_variants.sh first")
    results = [variant_result(name, work / name) for name in names]
    ranked = sorted((r for r in results if "mean_at_length" in r),
                    key=lambda r: (round(r["mean_at_length"], 6), r["min_at_length"]), reverse=True)
    best = ranked[0]["name"] if ranked else None
    return {"work_dir": str(work), "target": TARGET, "best": best, "ranking": [r["name"] for r in ranked],
            "variants": results}


def report_markdown(comparison: dict[str, Any]) -> str:
    """The comparison as Markdown: one row per variant at the trained length, then each full table."""
    rows = comparison["variants"]
    tasks = next((list(r["accuracy_at_length"]) for r in rows if "accuracy_at_length" in r), [])
    head = ["variant", *tasks, "mean", "min", "steps", "params", "train s", "status"]
    lines = ["# Training variants", "",
             f"Exact match at the trained length (validation split: the stream this choice is made on; report "
             f"test-split numbers from training.evaluate); best by mean: **{comparison['best'] or 'none'}**; "
             f"target {comparison['target']:g} on every task.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "accuracy_at_length" in r:
            cells = [f"{r['accuracy_at_length'][t]:.2f}" for t in tasks]
            cells += [f"{r['mean_at_length']:.3f}", f"{r['min_at_length']:.2f}"]
        else:
            cells = ["-"] * (len(tasks) + 2)
        extra = [str(r.get("steps", "-")), f"{r['params'] / 1e6:.2f}M" if "params" in r else "-",
                 str(r.get("train_wall_s", "-")), r["status"]]
        lines.append("| " + " | ".join([r["name"], *cells, *extra]) + " |")
    for r in rows:
        lines += ["", f"## {r['name']}", "", r.get("changes") or "(not a named variant)", ""]
        if r.get("args") is not None:
            lines += [f"Arguments after scripts/train_gpu.sh's recipe: `{' '.join(r['args']) or '(none)'}`", ""]
        if r.get("table"):
            lines += ["```", r["table"], "```"]
        elif r.get("last_quick_eval"):
            lines += [f"last quick evaluation: {json.dumps(r['last_quick_eval'])}"]
        if r.get("level_history") is not None:
            moves = "; ".join(f"level {h.get('earned_level', h.get('level'))} ({h['context']}) at "
                              f"{h['elapsed_s']} s by {h['by']}" for h in r["level_history"]) or "none"
            lines += ["", f"curriculum moves: {moves}"]
    return "\n".join(lines) + "\n"


def pack(work: Path, name: str, dest: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """WORK_DIR/<name> (ckpt/, train.log, train_summary.json) as dest/<name>.tar, paths under <name>/;
    a tar over `part_bytes` is cut into dest/<name>.tar.part-000, -001, ... of at most that size
    (a size-limited transfer takes each; `unpack` joins them). Returns the files written."""
    folder = work / name
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{name}.tar"
    with tarfile.open(out, "w") as tar:
        for path in sorted(folder.rglob("*")):
            # A save interrupted mid-way leaves ckpt.saving / ckpt.old beside ckpt: not part of the result.
            if path.is_file() and not any(part.endswith((".saving", ".old")) for part in path.relative_to(folder).parts):
                tar.add(path, arcname=f"{name}/{path.relative_to(folder)}")
    if out.stat().st_size <= part_bytes:
        return [out]
    parts = []
    with open(out, "rb") as whole:
        while chunk := whole.read(part_bytes):
            parts.append(dest / f"{name}.tar.part-{len(parts):03d}")
            parts[-1].write_bytes(chunk)
    out.unlink()
    return parts


def unpack(packed: Path, name: str, dest: Path) -> Path:
    """Extract `pack`'s output for `name` (packed/<name>.tar, or its parts in order) under dest;
    returns dest/<name> (its ckpt/ is the checkpoint folder)."""
    whole, parts = packed / f"{name}.tar", sorted(packed.glob(f"{name}.tar.part-*"))
    if not whole.is_file() and not parts:
        raise FileNotFoundError(f"neither {whole} nor {name}.tar.part-* in {packed}: give the folder pack wrote")
    dest.mkdir(parents=True, exist_ok=True)
    joined = whole if whole.is_file() else dest / f"{name}.tar"
    if not whole.is_file():
        with open(joined, "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
    with tarfile.open(joined) as tar:
        tar.extractall(dest, filter="data")
    if joined != whole:
        joined.unlink()
    return dest / name


def summarize(work: Path, names: list[str] | None = None, pack_to: Path | None = None) -> dict[str, Any]:
    comparison = compare(work, names)
    text = report_markdown(comparison)
    (work / "variants_summary.json").write_text(json.dumps(comparison, indent=1) + "\n")
    (work / "variants_summary.md").write_text(text)
    print(text)
    if pack_to is not None:
        pack_to.mkdir(parents=True, exist_ok=True)
        for name in [r["name"] for r in comparison["variants"]]:
            files = pack(work, name, pack_to)
            size = sum(f.stat().st_size for f in files)
            print(f"packed {name}: {', '.join(f.name for f in files)} ({size / 2**20:.1f} MiB)")
        for file in ("variants_summary.json", "variants_summary.md"):
            (pack_to / file).write_bytes((work / file).read_bytes())
    best = comparison["best"]
    if best:
        r = next(r for r in comparison["variants"] if r["name"] == best)
        verdict = "reaches" if r["reaches_target"] else "misses"
        print(f"best: {best} (mean {r['mean_at_length']:.3f}, worst task {r['min_at_length']:.2f} at "
              f"{r['compared_at']} tokens; {verdict} the {TARGET:g} target); its checkpoint: {r['checkpoint']}"
              + (f" (packed in {pack_to}: `python -m training.variants unpack {pack_to} {best} DEST` gives "
                 f"DEST/{best}/ckpt/)" if pack_to else ""))
    else:
        print("best: none (no variant finished its final evaluation)")
    return comparison


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.variants", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the recipes and what each changes")
    sub.add_parser("default", help="the names scripts/train_variants.sh trains when given none")
    a = sub.add_parser("args", help="a recipe's extra training.train arguments, space-separated")
    a.add_argument("name")
    s = sub.add_parser("summarize", help="compare the variants trained in WORK_DIR")
    s.add_argument("work", type=Path)
    s.add_argument("--variants", nargs="+", default=None, help="default: every WORK_DIR/<name>/train.log")
    s.add_argument("--pack-to", type=Path, default=None,
                   help="also write <name>.tar per variant and the summary files here")
    u = sub.add_parser("unpack", help="extract a packed variant (its tar, or its parts joined) under DEST")
    u.add_argument("packed", type=Path, help="the folder --pack-to wrote")
    u.add_argument("name")
    u.add_argument("dest", type=Path)
    args = p.parse_args(argv)
    if args.command == "unpack":
        print(unpack(args.packed, args.name, args.dest) / "ckpt")
    elif args.command == "list":
        for v in VARIANTS.values():
            print(f"{v.name}{' (default)' if v.name in DEFAULT_VARIANTS else ''}: {v.changes}\n"
                  f"    args: {' '.join(v.args) or '(none)'}")
    elif args.command == "default":
        print(" ".join(DEFAULT_VARIANTS))
    elif args.command == "args":
        print(" ".join(variant(args.name).args))
    else:
        summarize(args.work, args.variants, args.pack_to)
    return 0


__all__ = ["TARGET", "Variant", "VARIANTS", "DEFAULT_VARIANTS", "variant", "trained_length", "variant_result",
           "compare", "report_markdown", "pack", "unpack", "summarize", "main"]


if __name__ == "__main__":
    sys.exit(main())
