"""Plots of benchmark JSON: what the tables say, as pictures.

    python -m benchmarks.plot --kernels out/kernels.json --transfer out/transfer.json --decode out/decode.json \
        --throughput out/throughput_32k.json out/throughput_128k.json --sparse out/kernels.json \
        --overlap out/transfer.json --out benchmarks/plots

Each input is optional; each gives one PNG.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _context_axis(ax, contexts: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks([c / 1024 for c in contexts], [f"{c // 1024}K" for c in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context (tokens)")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_kernels(data: dict, out: Path) -> Path:
    """Attention kernel read bandwidth against context length, with the measured HBM limit."""
    rows = [r for r in data["rows"] if "ms" in r]
    hbm = data["limits"]["hbm_copy_rw_GBps"] / 1e3
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, t in zip(axes, sorted({r["T"] for r in rows})):
        for mode, style in (("resident", "o-"), ("sparse_10pct", "s--"), ("sparse_5pct", "^:")):
            for page in sorted({r["page_size"] for r in rows}):
                sel = sorted((r for r in rows if r["T"] == t and r["mode"] == mode and r["page_size"] == page),
                             key=lambda r: r["context"])
                if sel:
                    ax.plot([r["context"] / 1024 for r in sel], [r.get("graph_TBps") or r["TBps"] for r in sel],
                            style, label=f"{mode} P={page}")
        sdpa = sorted((r for r in rows if r["T"] == t and r["mode"] == "resident" and r["page_size"] == 16),
                      key=lambda r: r["context"])
        ax.plot([r["context"] / 1024 for r in sdpa], [r["kv_bytes"] / r["sdpa_ms"] / 1e9 for r in sdpa], "kx-",
                label="torch SDPA")
        ax.axhline(hbm, color="grey", lw=1)
        ax.text(32, hbm * 0.96, f"HBM copy {hbm:.2f} TB/s", va="top", fontsize=8, color="grey")
        ax.set_title(f"block of T={t} queries, 32 q / 8 KV heads x 128")
        _context_axis(ax, sorted({r["context"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("K+V read (TB/s, CUDA-graph replay)")
    axes[1].legend(fontsize=7, loc="center right")
    fig.suptitle(f"paged attention kernel, {data['device']}")
    return _save(fig, out / "kernels.png")


def plot_transfer(data: dict, out: Path) -> Path:
    """Page gather bandwidth from pinned host memory against the pinned copy limit."""
    if "gather" not in data:
        raise ValueError("this transfer JSON has no gather rows (an --overlap-only run): plot it with --overlap")
    fig, ax = plt.subplots(figsize=(6, 4))
    copy = data["copy"]["h2d_GBps"]
    for frac in sorted({g["fraction"] for g in data["gather"]}):
        sel = sorted((g for g in data["gather"] if g["fraction"] == frac), key=lambda g: g["page_size"])
        line, = ax.plot([g["page_size"] for g in sel], [g["GBps"] for g in sel], "o-",
                        label=f"gather {frac:.0%} of 128K")
        if all("contiguous_GBps" in g for g in sel):  # older files lack the zero-copy ceiling
            ax.plot([g["page_size"] for g in sel], [g["contiguous_GBps"] for g in sel], "s--", color=line.get_color(),
                    alpha=0.6, label=f"same bytes, contiguous ({frac:.0%})")
        if all("launch_included_GBps" in g for g in sel):  # files before the launch was taken off the clock
            ax.plot([g["page_size"] for g in sel], [g["launch_included_GBps"] for g in sel], "x:",
                    color=line.get_color(), alpha=0.6,
                    label=f"gather from an idle GPU, launch on the clock ({frac:.0%})")
    ax.axhline(copy, color="grey", lw=1, label=f"pinned copy {copy:.1f} GB/s")
    ax.axhline(0.9 * copy, color="grey", lw=1, ls=":", label="90% target")
    pages = sorted({g["page_size"] for g in data["gather"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(pages, [str(p) for p in pages])
    ax.minorticks_off()
    ax.set_xlabel("page size (tokens)")
    ax.set_ylabel("GB/s")
    ax.set_ylim(0, copy * 1.1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"UVA page gather, {data['device']}")
    return _save(fig, out / "transfer.png")


def _sparse_label(r: dict) -> str:
    """Tick label of a benchmarks.kernels sparse row: batch, block size, context and selection."""
    return f"N={r.get('N', 1)} T={r['T']}\n{r['context'] // 1024}K {r['mode'].split('_')[1]}"


def plot_sparse_attainable(runs: list[dict], out: Path) -> Path:
    """Sparse rows of benchmarks.kernels runs: graph-replay TB/s (dirty and clean cold L2; and per call
    in a graph of several layers' calls, where runs measured it) against what a replay can reach
    (launch floor + bytes at the HBM read rate; the copy rate in runs before 2026-12-06's thirteenth
    session), the layer run without the chained attention's L2 prefetch where runs measured it
    (from the nineteenth session on), what a call of the layer graph can reach (that graph's floor
    per call + bytes, from the seventeenth session on) and the 1.5 TB/s target."""
    rows = [(run, r) for run in runs for r in run["rows"] if "attainable_TBps" in r]
    if not rows:
        raise ValueError("no sparse rows with attainable_TBps: give benchmarks.kernels JSON from a run that "
                         "measured the launch floor")
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(rows)), 5))
    xs = range(len(rows))
    bars = [([r.get("graph_TBps_dirty_l2", r["graph_TBps"]) for _, r in rows],
             "graph replay (L2 flushed by writes)", None),
            ([r.get("graph_TBps_clean_l2", 0.0) for _, r in rows], "graph replay (clean cold L2)", None)]
    if any("layers_TBps" in r for _, r in rows):
        layers = max(r.get("layers", 0) for _, r in rows)
        bars.append(([r.get("layers_TBps", 0.0) for _, r in rows], f"per call, {layers} layers in one graph", None))
    if any("layers_TBps_no_prefetch" in r for _, r in rows):
        bars.append(([r.get("layers_TBps_no_prefetch", 0.0) for _, r in rows],
                     "the same, no L2 prefetch before the chained wait", None))
    bars.append(([r["attainable_TBps"] for _, r in rows], "attainable: floor + bytes at HBM read rate", "lightgrey"))
    if any("layers_attainable_TBps" in r for _, r in rows):
        bars.append(([r.get("layers_attainable_TBps", 0.0) for _, r in rows],
                     "attainable per call of the layer graph: its floor + bytes", "darkgrey"))
    width = 0.8 / len(bars)
    for i, (values, label, color) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar([x + offset for x in xs], values, width, label=label, color=color)
    ax.axhline(rows[0][0]["targets"]["sparse_TBps"], color="k", ls=":", lw=1, label="target")
    ax.set_xticks(list(xs), [_sparse_label(r) for _, r in rows], fontsize=7)
    ax.set_ylabel("K+V read (TB/s)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"sparse paged attention, 16-token pages, {rows[0][0]['device']}")
    return _save(fig, out / "sparse_attainable.png")


def plot_sparse_kernels(runs: list[dict], out: Path) -> Path:
    """Sparse rows of benchmarks.kernels runs that timed both attention kernels: the graph-replay TB/s
    of the Triton kernel's best variant, the warp-specialised kernel's best, and what a call with no
    launch options got, against the 1.5 TB/s target."""
    from benchmarks.kernels import best_graph_ms_by_kernel

    rows = [(run, r, best) for run in runs for r in run["rows"]
            if len(best := best_graph_ms_by_kernel(r)) == 2]
    if not rows:
        raise ValueError("no sparse rows that timed both kernels: give benchmarks.kernels JSON from an sm_90 run "
                         "whose sweep had a warp_specialized variant")
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    bars = [("Triton kernel, best variant", [r["kv_bytes"] / b["triton"] / 1e9 for _, r, b in rows]),
            ("warp-specialised kernel, best variant", [r["kv_bytes"] / b["ws"] / 1e9 for _, r, b in rows]),
            ("no launch options (paged_attention's pick)", [r.get("default_graph_TBps", 0.0) for _, r, _ in rows])]
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars):
        ax.bar([x + (i - (len(bars) - 1) / 2) * width for x in range(len(rows))], values, width, label=label)
    ax.axhline(rows[0][0]["targets"]["sparse_TBps"], color="k", ls=":", lw=1, label="target")
    ax.set_xticks(range(len(rows)), [_sparse_label(r) for _, r, _ in rows], fontsize=7)
    ax.set_ylabel("K+V read (TB/s), graph replay")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"sparse paged attention by kernel, {rows[0][0]['device']}", fontsize=9)
    return _save(fig, out / "sparse_kernels.png")


def plot_split_path(runs: list[dict], out: Path) -> Path:
    """Sparse rows of benchmarks.kernels runs whose graph-best variant has splits: its replay with the
    split path as shipped (16-bit partials, merge launched as a programmatic dependent) and with each
    saving switched off, as TB/s of K+V read."""
    rows = [(run, r) for run in runs for r in run["rows"] if "split_path" in r]
    if not rows:
        raise ValueError("no sparse rows with split_path: give benchmarks.kernels JSON from a run that "
                         "compared the split path's variants")
    names = list(rows[0][1]["split_path"])
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):  # a variant a row could not run (recorded as an error) draws no bar
        ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(rows))],
               [r["split_path"].get(name, {}).get("graph_TBps", 0.0) for _, r in rows], width,
               label=name.replace("_", " "))
    ax.axhline(rows[0][0]["targets"]["sparse_TBps"], color="k", ls=":", lw=1, label="target")
    ax.set_xticks(range(len(rows)), [f"{_sparse_label(r)} S={r['graph_best']['num_splits']}" for _, r in rows],
                  fontsize=7)
    ax.set_ylabel("K+V read (TB/s), graph replay")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"sparse paged attention: the split path's savings, {rows[0][0]['device']}", fontsize=9)
    return _save(fig, out / "sparse_split_path.png")


def plot_prefetch_pages(runs: list[dict], out: Path) -> Path:
    """Sparse rows of benchmarks.kernels runs made with --prefetch-pages: the layer run's time per
    call against the pages per split that the chained attention prefetches into L2 before its wait,
    one line per row (0: no prefetch)."""
    rows = [(run, r) for run in runs for r in run["rows"] if "layers_ms_by_prefetch_pages" in r]
    if not rows:
        raise ValueError("no sparse rows with layers_ms_by_prefetch_pages: give benchmarks.kernels JSON from a "
                         "run made with --prefetch-pages")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _, r in rows:
        by = sorted((int(c), ms) for c, ms in r["layers_ms_by_prefetch_pages"].items())
        ax.plot([c for c, _ in by], [1e3 * ms for _, ms in by], marker="o", label=_sparse_label(r))
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("prefetch_pages (pages per split, before the wait)")
    ax.set_ylabel("us per call, 8-layer graph")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    ax.set_title(f"sparse paged attention: L2 prefetch before the PDL wait, {rows[0][0]['device']}", fontsize=9)
    return _save(fig, out / "sparse_prefetch_pages.png")


def plot_overlap(data: dict, out: Path) -> Path:
    """The runtime's side fetch beside compute (benchmarks.transfer): share of the transfer hidden,
    by the runtime's events and end to end (one line per compute stand-in), against the gather's
    program cap, with the SM-tax model."""
    cases = [c for c in data["overlap"]["cases"] if c["case"] == "compute>transfer"
             and c["compute_priority"] == "high" and c.get("units_per_program") is None and c["max_programs"]]
    if not cases:
        raise ValueError("no capped compute>transfer overlap rows in this transfer JSON")
    cases.sort(key=lambda c: c["max_programs"])
    kinds = list(dict.fromkeys(c.get("compute_kind", "matmul") for c in cases))
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in kinds:
        rows = [c for c in cases if c.get("compute_kind", "matmul") == kind]
        caps = [c["max_programs"] for c in rows]
        ax.plot(caps, [100 * c["hidden_fraction"] for c in rows], "o-", label=f"hidden (events), {kind}")
        ax.plot(caps, [100 * c["hidden_fraction_e2e"] for c in rows], "s-", label=f"hidden end to end, {kind}")
    caps = sorted({c["max_programs"] for c in cases})
    if all("sm_tax_model_e2e" in c for c in cases):
        tax = {c["max_programs"]: c["sm_tax_model_e2e"] for c in cases}
        ax.plot(caps, [100 * tax[c] for c in caps], "k--", lw=1, label="SM-tax model 1 - cap / SMs")
    ax.axhline(90, color="grey", ls=":", lw=1, label="90% target")
    ax.set_xlabel("gather programs (max_programs)")
    ax.set_ylabel("% of transfer time hidden")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    o = data["overlap"]
    ax.set_title(f"side fetch beside compute ({', '.join(kinds)}), {o['MB_per_layer']:.0f} MB/layer, "
                 f"{data['device']}", fontsize=9)
    return _save(fig, out / "overlap.png")


def plot_decode(data: dict, out: Path) -> Path:
    """Generated tokens per second of the engine, per backend, batch and context."""
    rows = [r for r in data["rows"] if "tokens_per_s" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in sorted({r["backend"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows}):
            sel = sorted((r for r in rows if r["backend"] == backend and r["batch"] == batch), key=lambda r: r["context"])
            ax.plot([r["context"] / 1024 for r in sel], [r["tokens_per_s"] for r in sel], "o-",
                    label=f"dense/{backend}, batch {batch}")
    _context_axis(ax, sorted({r["context"] for r in rows}))
    ax.set_ylabel("generated tokens/s")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    meta = data["meta"]
    ax.set_title(f"{rows[0]['geometry']}, block {meta['block_size']}, {meta['steps']} steps, {meta['device']}",
                 fontsize=9)
    return _save(fig, out / "decode.png")


def plot_throughput_by_context(runs: list[dict], out: Path) -> Path:
    """Each mode at its best measured batch, per context, from one or more throughput JSON files
    (`benchmarks.throughput`), with herald's ratio over dense above its bars."""
    best: dict[tuple[int, str], dict] = {}
    for run in runs:
        for r in run["rows"]:
            if "error" in r or not r.get("tokens_per_s"):
                continue
            key = (r["context"], r["label"])
            if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                best[key] = r
    contexts = sorted({c for c, _ in best})
    labels = sorted({label for _, label in best}, key=lambda label: (label != "dense", label))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.6 + 1.7 * len(contexts), 4.2))
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j, c in enumerate(contexts) if (c, label) in best]
        rows = [best[(c, label)] for c in contexts if (c, label) in best]
        bars = ax.bar(xs, [r["tokens_per_s"] for r in rows], width, label=label)
        for bar, r in zip(bars, rows):
            dense = best.get((r["context"], "dense"))
            text = f"batch {r['batch']}"
            if label != "dense" and dense is not None:
                text = f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}x\n" + text
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(contexts)), [f"{c // 1024}K" for c in contexts])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("generated tokens/s (best batch)")
    ax.set_ylim(0, 1.18 * max(r["tokens_per_s"] for r in best.values()))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    meta = runs[0].get("meta", {})
    ax.set_title(f"{meta.get('geometry', '')} {meta.get('device', '')}: each mode at its best measured batch",
                 fontsize=9)
    return _save(fig, out / "throughput_by_context.png")


def plot_scaling(runs: list[dict], out: Path) -> Path:
    """Tokens/s (each mode at its best measured batch) and that row's block latency against context,
    one line per mode, from `benchmarks.throughput` JSON (one run over several contexts)."""
    best: dict[tuple[str, int], dict] = {}
    for run in runs:
        for r in run["rows"]:
            if "error" not in r and r.get("tokens_per_s"):
                key = (r["label"], r["context"])
                if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                    best[key] = r
    contexts = sorted({c for _, c in best})
    fig, (tps, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in sorted({label for label, _ in best}, key=lambda label: (label != "dense", label)):
        rows = [best[(label, c)] for c in contexts if (label, c) in best]
        xs = [r["context"] / 1024 for r in rows]
        tps.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=label)
        lat.plot(xs, [r["block_p50_s"] * 1e3 for r in rows], marker="o", label=label)
        for r in rows:
            tps.annotate(f"b{r['batch']}", (r["context"] / 1024, r["tokens_per_s"]), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")
    for ax, ylabel in ((tps, "generated tokens/s (best batch)"), (lat, "block latency p50, ms (at that batch)")):
        _context_axis(ax, contexts)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    meta = runs[0].get("meta", {})
    fig.suptitle(f"{meta.get('geometry', '')} {meta.get('device', '')}: scaling with context", fontsize=9)
    return _save(fig, out / "throughput_scaling.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", type=Path)
    parser.add_argument("--transfer", type=Path)
    parser.add_argument("--decode", type=Path)
    parser.add_argument("--throughput", type=Path, nargs="+", help="benchmarks.throughput JSON files (contexts merged)")
    parser.add_argument("--scaling", type=Path, nargs="+",
                        help="benchmarks.throughput JSON files: tokens/s and block latency against context, a line "
                             "per mode")
    parser.add_argument("--sparse", type=Path, nargs="+",
                        help="benchmarks.kernels JSON files: sparse rows against their attainable rate")
    parser.add_argument("--sparse-kernels", type=Path, nargs="+",
                        help="benchmarks.kernels JSON files: each sparse row's best Triton and warp-specialised "
                             "variant and its default")
    parser.add_argument("--split-path", type=Path, nargs="+",
                        help="benchmarks.kernels JSON files: each sparse row's split path with its savings off")
    parser.add_argument("--prefetch-pages", type=Path, nargs="+",
                        help="benchmarks.kernels JSON files from runs made with --prefetch-pages: the layer run by "
                             "the count of pages prefetched before the chained wait")
    parser.add_argument("--overlap", type=Path, help="benchmarks.transfer JSON: the side fetch's overlap by program cap")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/plots"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path, plot in ((args.kernels, plot_kernels), (args.transfer, plot_transfer), (args.decode, plot_decode),
                       (args.overlap, plot_overlap)):
        if path is not None:
            print("wrote", plot(json.loads(path.read_text()), args.out))
    if args.sparse:
        print("wrote", plot_sparse_attainable([json.loads(p.read_text()) for p in args.sparse], args.out))
    if args.sparse_kernels:
        print("wrote", plot_sparse_kernels([json.loads(p.read_text()) for p in args.sparse_kernels], args.out))
    if args.split_path:
        print("wrote", plot_split_path([json.loads(p.read_text()) for p in args.split_path], args.out))
    if args.prefetch_pages:
        print("wrote", plot_prefetch_pages([json.loads(p.read_text()) for p in args.prefetch_pages], args.out))
    if args.throughput:
        print("wrote", plot_throughput_by_context([json.loads(p.read_text()) for p in args.throughput], args.out))
    if args.scaling:
        print("wrote", plot_scaling([json.loads(p.read_text()) for p in args.scaling], args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
