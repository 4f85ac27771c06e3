"""One sparse row, timed for launch configs named one by one, split count included.

`benchmarks.kernels` sweeps configs against split counts it derives (the default's neighbours, 1-16,
whole waves); this probe times exactly the (config, num_splits) pairs given, each as a one-call
graph replay and in the layer run (`layer_run_fields`: the call as one of --layers back to back in
one graph; layer_us_no_pdl: the same with the split merges launched plainly). Times in us. Same shape,
pool and clean-L2 flush as `benchmarks.kernels`'s sparse rows; every output is checked against the
fp32 reference. Prints one JSON line per pair; --out also writes them all.

    python scripts/dev/probe_layer_run_configs.py --T 32 --context 131072 --fraction 0.05 \\
        --configs '[{"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 4, "num_splits": 16},
                    {"warp_specialized": true, "num_splits": 12}]'
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.kernels import (  # noqa: E402
    Call, Shape, Timer, layer_run_fields, options_of, preallocated, rel_err, sparse_pool)

PAGE = 16


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=32, dest="t")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--configs", type=json.loads, required=True,
                    help="JSON list of AttentionOptions fields, each with num_splits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write every result to this JSON file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_layer_run_configs needs a CUDA GPU (none found)")
    if any("num_splits" not in cfg for cfg in args.configs):
        raise SystemExit("every config needs num_splits (this probe times the pairs it is given)")
    from gpu_kernels.paged_attention import paged_attention_reference

    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    sh = Shape(args.t, args.context, PAGE, gen, dev, args.batch)
    k_pool, v_pool, table, kv_len = sparse_pool(sh, args.fraction)
    n_sel = table.shape[-1]
    ref = paged_attention_reference(sh.q, k_pool, v_pool, table, kv_len, scale=sh.scale)[0].float()
    nbytes = 2 * k_pool.numel() * k_pool.element_size()
    timer = Timer(warmup_ms=10, rep_ms=40)
    call = Call(sh, k_pool, v_pool, table, kv_len)
    rows = []
    for cfg in args.configs:
        plan = call.plan(options_of(cfg))
        bufs = preallocated(plan)
        graph_ms = timer.graph_ms(lambda: call.run(plan, **bufs))
        row = dict(cfg=cfg, graph_us=1e3 * graph_ms, err=rel_err(bufs["out"].float(), ref))
        run = layer_run_fields(timer, sh, (k_pool, v_pool, table, kv_len), cfg, n_sel, nbytes, ref, args.layers)
        row.update(layer_us=1e3 * run["layers_ms"], layer_TBps=run["layers_TBps"], layer_err=run["layers_rel_err"])
        if "layers_ms_no_pdl" in run:
            row.update(layer_us_no_pdl=1e3 * run["layers_ms_no_pdl"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(T=args.t, context=args.context, fraction=args.fraction, batch=args.batch,
                           kv_bytes=nbytes, device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
