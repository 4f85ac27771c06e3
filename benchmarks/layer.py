"""One decoder layer's own work (everything but attention), fused vs plain, replayed from CUDA graphs.

The plain path (`DecoderLayer.forward`) runs some 65 small kernels per layer besides its GEMMs;
the fused one (`DecoderLayer.forward_fused`, what `Transformer.set_fused(True)` runs) runs one
QKV and one gate/up GEMM, q/k norm + RoPE + layouts in one kernel, SiLU * mul in one, and the
residual adds inside the RMSNorms. Attention is left out of both: the layer hands q/k/v to
`PassThroughAttention`, which returns q as the attention output (attention's shape, no work),
so what is timed is exactly the part the fusion changes. Random weights at a real geometry
(Qwen3-8B by default), bf16, N*T tokens per pass (N rows of a T-token block).

Per token count, each path is captured as LAYER_CALLS chained layer calls in one CUDA graph and
replayed; the table gives microseconds per layer, the fused speed-up, and the weight-read floor:
the layer's weight bytes over the device copy bandwidth measured in the same run (read + write).
It also counts the CUDA kernels one eager layer call launches (torch.profiler), and checks
fused against plain (relative error of one layer's output). Prints a table and writes
$OUT/layer.json (OUT defaults to ./out). About 20 s on an H100/H200.

    python -m benchmarks.layer                          # Qwen3-8B geometry, N*T in 32 128 256
    python -m benchmarks.layer --tokens 128 --block-size 32
    TRITON_INTERPRET=1 python -m benchmarks.layer --geometry tiny --device cpu --tokens 8 --reps 1  # smoke, no GPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

from benchmarks.decode import GEOMETRIES, geometry
from runtime.attention import AttentionMode, ForwardBatch
from runtime.config import ModelConfig
from runtime.model import DecoderLayer, Rotary, init_qwen_weights

LAYER_CALLS = 8  # layer calls per captured graph: one replay's launch cost is spread over them


class PassThroughAttention(AttentionMode):
    """Returns q as the attention output: a layer's attention costs nothing, the rest runs as is."""

    name = "pass-through"

    def add_sequence(self, seq_id: int, max_tokens: int) -> None:
        pass

    def remove_sequence(self, seq_id: int) -> None:
        pass

    def plan(self, batch: ForwardBatch) -> None:
        pass

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q


def build_layer(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int) -> DecoderLayer:
    """One decoder layer with Qwen's random init (N(0, 0.02) matrices, unit norms), fused weights built."""
    with torch.device(device):
        layer = DecoderLayer(config, 0).to(dtype)
    init_qwen_weights(layer, 0.02, torch.Generator(device).manual_seed(seed))
    layer.set_fused(True)  # the plain forward reads the same (viewed) parameters
    return layer.requires_grad_(False).eval()


def weight_bytes(layer: DecoderLayer) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def copy_bandwidth_GBps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (the HBM roofline for streaming)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / min(times) / 1e9


class LayerPaths:
    """The plain and fused calls of one layer over fixed input tensors (so a graph can replay them)."""

    def __init__(self, layer: DecoderLayer, config: ModelConfig, n: int, t: int, dtype: torch.dtype,
                 device: torch.device, seed: int):
        gen = torch.Generator(device).manual_seed(seed)
        self.layer, self.attention = layer, PassThroughAttention()
        self.x = torch.randn(n, t, config.hidden_size, generator=gen, device=device).to(dtype)
        positions = torch.randint(0, 32768, (n, t), generator=gen, device=device)
        self.cos, self.sin = Rotary(config).cos_sin(positions, dtype)
        norm = layer.input_layernorm
        self.normed = norm(self.x)  # the fused path carries (input_layernorm(h), h) between layers

    def plain(self, calls: int = 1) -> torch.Tensor:
        x = self.x
        for _ in range(calls):
            x = self.layer(x, self.cos, self.sin, self.attention, 0)
        return x

    def fused(self, calls: int = 1) -> torch.Tensor:
        normed, residual = self.normed, self.x
        for _ in range(calls):
            normed, residual = self.layer.forward_fused(normed, residual, self.cos, self.sin, self.attention, 0,
                                                        self.layer.input_layernorm)
        return residual


def graph_us_per_call(fn, calls: int, reps: int) -> float:
    """Median GPU time of one replay of a graph of fn(calls), per call, in microseconds."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        fn(calls)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(calls)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def wall_us_per_call(fn, calls: int, reps: int) -> float:
    """Without CUDA (smoke runs): median wall time of eager calls."""
    fn(1)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(calls)
        times.append((time.perf_counter() - start) * 1e6 / calls)
    return statistics.median(times)


def kernels_per_call(fn) -> int | None:
    """CUDA kernels (and copies) one eager call launches (None when the profiler cannot see the device)."""
    from torch.profiler import ProfilerActivity, profile

    fn(1)
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(1)
            torch.cuda.synchronize()
    except RuntimeError as err:  # CUPTI unavailable: the timings stand without the count
        print(f"  (kernel count unavailable: {err})", flush=True)
        return None
    count = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return count or None  # no device events recorded: the profiler saw nothing, not zero kernels


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def measure(layer: DecoderLayer, config: ModelConfig, tokens: int, block: int, dtype: torch.dtype,
            device: torch.device, reps: int, seed: int) -> dict:
    if tokens % block:
        raise ValueError(f"--tokens {tokens} must be a multiple of --block-size {block} (N = tokens / block)")
    n = tokens // block
    row = dict(tokens=tokens, N=n, T=block)
    with torch.no_grad():
        paths = LayerPaths(layer, config, n, block, dtype, device, seed)
        row["rel_err_fused_vs_plain"] = rel_err(paths.fused(), paths.plain())
        if device.type == "cuda":
            row["plain_us"] = graph_us_per_call(paths.plain, LAYER_CALLS, reps)
            row["fused_us"] = graph_us_per_call(paths.fused, LAYER_CALLS, reps)
            row["plain_kernels"] = kernels_per_call(paths.plain)
            row["fused_kernels"] = kernels_per_call(paths.fused)
        else:
            row["plain_us"] = wall_us_per_call(paths.plain, 1, reps)
            row["fused_us"] = wall_us_per_call(paths.fused, 1, reps)
    row["speedup"] = row["plain_us"] / row["fused_us"]
    return row


def print_table(rows: list[dict], floor_us: float | None) -> None:
    print()
    print(f"{'N*T':>5} {'N x T':>8} {'plain us':>9} {'fused us':>9} {'speed-up':>9} {'kernels':>9} "
          f"{'floor us':>9} {'fused/floor':>11} {'rel err':>8}")
    for r in rows:
        kernels = f"{r.get('plain_kernels')}->{r.get('fused_kernels')}" if r.get("plain_kernels") else "-"
        floor = f"{floor_us:9.1f} {r['fused_us'] / floor_us:11.2f}" if floor_us else f"{'-':>9} {'-':>11}"
        print(f"{r['tokens']:>5} {r['N']:>3} x {r['T']:<3} {r['plain_us']:9.1f} {r['fused_us']:9.1f} "
              f"{r['speedup']:8.2f}x {kernels:>9} {floor} {r['rel_err_fused_vs_plain']:8.1e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="qwen3-8b", choices=sorted(GEOMETRIES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 128, 256], help="N*T per pass (default 32 128 256)")
    ap.add_argument("--block-size", type=int, default=4, help="T, tokens per row (default 4; N = tokens / T)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=20, help="timed replays per measurement (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "./out"),
                    help="folder for layer.json (default $OUT or ./out)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.layer needs a CUDA GPU (none found); --device cpu runs a smoke test")
    dtype = getattr(torch, args.dtype)
    config = geometry(args.geometry, 32768 + 64)
    started = time.time()
    print(f"{args.geometry}: hidden {config.hidden_size}, {config.num_heads}/{config.num_kv_heads} heads of "
          f"{config.head_dim}, intermediate {config.intermediate_size}, {args.dtype} on {device}", flush=True)
    layer = build_layer(config, dtype, device, args.seed)
    nbytes = weight_bytes(layer)
    floor_us = None
    bandwidth = None
    if device.type == "cuda":
        bandwidth = copy_bandwidth_GBps(device)
        floor_us = nbytes / (bandwidth * 1e9) * 1e6
        print(f"layer weights {nbytes / 2**20:.0f} MiB; device copy {bandwidth:.0f} GB/s -> weight-read floor "
              f"{floor_us:.1f} us per layer", flush=True)
    rows = []
    for tokens in args.tokens:
        row = measure(layer, config, tokens, args.block_size, dtype, device, args.reps, args.seed)
        print(f"  N*T={tokens}: plain {row['plain_us']:.1f} us, fused {row['fused_us']:.1f} us "
              f"({row['speedup']:.2f}x), rel err {row['rel_err_fused_vs_plain']:.1e}", flush=True)
        rows.append(row)
    print_table(rows, floor_us)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "layer.json")
    with open(path, "w") as f:
        json.dump(dict(date=datetime.datetime.now().isoformat(timespec="seconds"), geometry=args.geometry,
                       dtype=args.dtype, device=str(device),
                       device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       torch=torch.__version__, layer_weight_bytes=nbytes, copy_GBps=bandwidth,
                       weight_floor_us=floor_us, layer_calls_per_graph=LAYER_CALLS, block_size=args.block_size,
                       seconds=time.time() - started, rows=rows), f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
