#!/usr/bin/env bash
# A/B of two copies of gpu_kernels in one call on one GPU: the working tree's (A) against another
# copy's (B), each through the same benchmark, in the order A, B, A (so drift shows), with results in
# $OUT/ab_a, $OUT/ab_b and $OUT/ab_a2.
#   bash scripts/dev/ab_kernels.sh OTHER_DIR kernels|transfer [benchmark args...]
#   e.g. git archive HEAD gpu_kernels | tar -x -C .ab/head   (here, before the device call; carry .ab)
#        bash scripts/dev/ab_kernels.sh .ab/head kernels --sparse-only --contexts 131072 --layers 8
# Every side runs under `python -P`: plain `python -m` puts the working directory ahead of PYTHONPATH,
# so both sides would import the working tree (the fifteenth to seventeenth sessions' A/Bs did;
# benchmarks/RESULTS.md, eighteenth session). The run fails unless A and B imported different copies.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { sed -n 2,6p "$0" >&2; exit 2; }
[ -d "$1/gpu_kernels" ] || { echo "ab_kernels: $1 has no gpu_kernels folder to compare with" >&2; exit 2; }
other=$(cd "$1" && pwd)
[ "$other" != "$PWD" ] || { echo "ab_kernels: $1 is the working tree itself; pass another copy" >&2; exit 2; }
bench=$2
shift 2
case $bench in
  kernels|transfer) ;;
  *) echo "ab_kernels: $bench does not record which gpu_kernels it ran; use kernels or transfer" >&2; exit 2 ;;
esac
export OUT=${OUT:-$PWD/out} PYTHONUNBUFFERED=1
for side in a b a2; do
  if [ "$side" = b ]; then path=$other:$PWD; else path=$PWD; fi
  echo "=== ab_kernels side $side: benchmarks.$bench $*"
  PYTHONPATH=$path python3 -P -m "benchmarks.$bench" "$@" --out "$OUT/ab_$side"
done
python3 - "$OUT" "$bench" "$other" <<'EOF'
import json
import os
import sys

out, bench, other = sys.argv[1:]
ran = {side: json.load(open(os.path.join(out, f"ab_{side}", f"{bench}.json")))["gpu_kernels"] for side in ("a", "b", "a2")}
if ran["a"] != ran["a2"] or ran["b"] != os.path.join(other, "gpu_kernels") or ran["a"] == ran["b"]:
    sys.exit(f"ab_kernels: the sides did not run the copies asked for: {ran}")
print(f"ab_kernels: A and A2 ran {ran['a']}, B ran {ran['b']}")
EOF
