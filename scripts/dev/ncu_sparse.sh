#!/usr/bin/env bash
# Nsight Compute counters for the sparse kernel's shapes (needs ncu and a GPU whose counters it can
# read): each probe_sparse_phases.py case runs once in a profiler range; the details page (speed of
# light, occupancy, warp stalls, memory tables) of every kernel lands in $OUT as CSV, and the
# per-instruction source page (SASS, with warp-stall samples by reason) as gzipped CSV.
# Usage: bash scripts/dev/ncu_sparse.sh NAME [probe_sparse_phases.py args]   e.g. n1 --T 16 32 --splits 0
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
name=$1; shift
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found" >&2; exit 2; }
"$NCU" --clock-control none --profile-from-start off --set full --import-source no \
  -k 'regex:paged_attention|merge_splits' -f -o "/tmp/$name" \
  python3 scripts/dev/probe_sparse_phases.py --ncu "$@" > "$OUT/${name}_cases.log" 2>&1
rc=$?
"$NCU" -i "/tmp/$name.ncu-rep" --page details --csv > "$OUT/${name}_details.csv" 2>>"$OUT/${name}_cases.log"
# Per SASS instruction: executions and warp-stall samples by reason (where each kernel's warps wait)
"$NCU" -i "/tmp/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/${name}_sass.csv" \
  2>>"$OUT/${name}_cases.log" && gzip -f "$OUT/${name}_sass.csv"
exit $rc
