#!/usr/bin/env bash
# On a lent GPU, in one call: the gpu-marked tests, then the benchmarks; everything lands in $OUT.
# Usage: bash scripts/gpu_check.sh ["benchmark args" ...]   e.g. "kernels --quick" decode
# (default: kernels transfer decode). SKIP_TESTS=1 skips the tests; BENCH_TIMEOUT caps each benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
log=$OUT/gpu_check.log
{
  date -u
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv
  nproc; free -g | head -2
} 2>&1 | tee "$log"
status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -m gpu -q -p no:cacheprovider -x --timeout=300 tests 2>&1 | tail -n 40 | tee -a "$log" || status=1
fi
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(kernels transfer decode)
for bench in "${benches[@]}"; do
  read -r name args <<<"$bench"
  echo "=== benchmarks.$name $args" | tee -a "$log"
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-400}" python3 -m "benchmarks.$name" $args 2>&1 | tee -a "$log" || status=1
done
exit $status
