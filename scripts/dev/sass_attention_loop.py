"""How many instructions one K/V tile costs the sparse attention kernel on sm_90, without a GPU.

Compiles `attention_kernels.paged_attention_kernel` for Hopper with Triton's bundled ptxas, specialised the way the
launcher specialises the pool-layout call of `benchmarks.kernels` (16-byte aligned pointers and
strides, a stride of 1 made a constant), disassembles it with the bundled cuobjdump, and prints, per
launch config, the kernel's shared memory and the static instruction count of its main loop (the
body between the loop's backward branch and its target) by opcode: what a change to the loop's
arithmetic moves. Time the change too: at N=1, cutting this count from 640 to 458 and then to 375
left the sparse kernel's time unchanged on an H100 (`benchmarks/RESULTS.md`, 2026-12-06): on a
clean L2 that case streams its tiles at about 90% of HBM's read rate. Use the Triton the GPU runs
(3.6 on the lent machines; other versions pipeline differently): the shared-memory figure then
matches ncu's.

    python scripts/dev/sass_attention_loop.py [--configs '[{"block_m": 64, "num_warps": 4, "T": 16},
        {"block_m": 128, "num_warps": 8, "T": 32, "OFFSETS_64": true}]']
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.kernels import HKV, HQ, D  # noqa: E402  (benchmarks.kernels' shape)
from gpu_kernels.attention_kernels import paged_attention_kernel  # noqa: E402

PAGE = 16
POINTERS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pt_ptr": "*i32", "kvlen_ptr": "*i32",
            "kb_ptr": "*bf16", "vb_ptr": "*bf16", "out_ptr": "*bf16", "lse_ptr": "*fp32", "part_ptr": "*bf16",
            "part_lse_ptr": "*fp32", "pscore_ptr": "*fp32", "tscore_ptr": "*fp32"}
ADDRESS = re.compile(r"\s+/\*([0-9a-f]{4})\*/\s+")


def integer_args(t: int) -> dict:
    """The pool-layout call's integer arguments (None: not specialised, `do_not_specialize`)."""
    return dict(stride_qn=HQ * t * D, stride_qh=t * D, stride_qt=D, stride_kp=PAGE * D, stride_kh=0, stride_kt=D,
                stride_ptn=None, stride_pth=None, stride_pte=1, stride_ln=HKV, stride_lh=1,
                stride_bn=0, stride_bh=0, stride_bt=0, max_pages=None, split_tokens=None, num_splits=None,
                num_kv_pages=None, prefetch_pages=None)


def compile_kernel(block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 3, T: int = 16,
                   **constexprs):
    """The kernel compiled for sm_90 as the launcher would for this config."""
    g = HQ // HKV
    const = dict(HKV=HKV, G=g, T=T, HEAD_DIM=D, BLOCK_D=D, BLOCK_M=block_m,
                 ROW_BLOCKS=triton.cdiv(g * T, block_m), BLOCK_N=block_n, PAGE=PAGE, WRITE_FINAL=False,
                 HAS_BLOCK=False, PAGE_SCORES=False, TOKEN_SCORES=False, UPCAST=False, DOT_PRECISION="tf32",
                 USE_PDL=True, AFTER_PRIOR=False, OFFSETS_64=False, PREFETCH_WIDTH=0, PAGE_BYTES=0)
    const.update(constexprs)
    ints = integer_args(T)
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(paged_attention_kernel.fn).parameters):
        if name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in const:
            signature[name] = "constexpr"
        elif name == "sm_scale":
            signature[name] = "fp32"
        elif ints[name] == 1:  # the launcher passes a 1 as a constant
            signature[name] = "constexpr"
            const[name] = 1
        else:
            signature[name] = "i32"
            if ints[name] is not None and ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(paged_attention_kernel, signature, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 128),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def sass_lines(kernel) -> list[str]:
    """The kernel's SASS, one instruction per line, each starting with its address."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        text = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return [line for line in text.splitlines() if ADDRESS.match(line)]


def main_loop(sass: list[str]) -> list[str]:
    """The longest loop body: from a backward branch's target to the branch."""
    addrs = [int(ADDRESS.match(line).group(1), 16) for line in sass]
    best: list[str] = []
    for i, line in enumerate(sass):
        target = re.search(r"BRA\b.*?0x([0-9a-f]+)", line)
        if target and int(target.group(1), 16) < addrs[i] and int(target.group(1), 16) in addrs:
            body = sass[addrs.index(int(target.group(1), 16)):i + 1]
            best = max(best, body, key=len)
    return best


def opcode(line: str) -> str:
    words = ADDRESS.sub("", line).split(";")[0].split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=json.loads, default=[
        dict(block_m=64, num_warps=4, T=16), dict(block_m=128, num_warps=8, T=32),
        dict(block_m=128, num_warps=8, T=64)], help="JSON list of compile_kernel keyword sets")
    args = ap.parse_args()
    rows = []
    for cfg in args.configs:
        kernel = compile_kernel(**cfg)
        loop = main_loop(sass_lines(kernel))
        ops = Counter(opcode(line) for line in loop)
        row = dict(config=cfg, triton=triton.__version__, shared_bytes=kernel.metadata.shared,
                   loop_instructions=len(loop), by_opcode=dict(ops.most_common()))
        rows.append(row)
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(12))
        print(f"{json.dumps(cfg)}: shared {row['shared_bytes']} B, loop {len(loop)} instructions ({top})", flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
