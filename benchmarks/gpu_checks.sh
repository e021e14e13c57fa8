#!/usr/bin/env bash
# The checks a lent GPU machine runs, in order, each bounded so that all of them fit one short
# lease; every output lands in OUT_DIR (benchmarks/results/ keeps them):
#   1. benchmarks/gpu.py: extraction, store path, statistics and k-means at the research width;
#   2. reproducibility on CUDA: the tiny profile materialised on the GPU (its report names the GPU
#      and its compute capability), verify-report of that report on the GPU, and of a report
#      written on a CPU (CPU_REPORT_ROOT, a tiny data root carried along) recomputed on the GPU;
#   3. the research rehearsal (README's offline gemma-2-2b preflight) on CUDA.
# Usage: benchmarks/gpu_checks.sh OUT_DIR [CPU_REPORT_ROOT]; DEADLINE (seconds, default 560)
# bounds the whole script: the rehearsal gets what the first two steps left.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR [CPU_REPORT_ROOT]}
cpu_root=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 - <<'EOF'
import torch
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF

echo "== 1. benchmarks/gpu.py"
timeout 200 python3 benchmarks/gpu.py --kmeans-iters 3 --json "$out/gpu_h200.json" 2>&1 | tee "$out/gpu_h200.txt" | tail -40

echo "== 2. reproducibility on CUDA"
gpu_root=/tmp/gpu_tiny
timeout 150 python3 -m gemma_assets.cli materialize --config tiny --data-root "$gpu_root" --log-level WARNING \
  > "$out/tiny_cuda_materialize.log" 2>&1
echo "materialize rc=$?"
grep -A2 "^Numeric environment" "$gpu_root/tiny/report/report.md"
verified="$out/verify_on_cuda.txt"
timeout 60 python3 -m gemma_assets.cli verify-report "$gpu_root/tiny/report" --data-root "$gpu_root" --device cuda \
  > "$verified" 2>&1
echo "verify GPU report on CUDA rc=$?"; tail -1 "$verified"
if [ -n "$cpu_root" ]; then
  timeout 60 python3 -m gemma_assets.cli verify-report "$cpu_root/tiny/report" --data-root "$cpu_root" --device cuda \
    >> "$verified" 2>&1
  echo "verify CPU report on CUDA rc=$?"; tail -1 "$verified"
fi
# the GPU-written run comes back whole (less its feature pages) for a verify-report on a CPU
tar -czf "$out/tiny_cuda_run.tar.gz" -C "$gpu_root" --exclude='tiny/report/features' tiny models

echo "== 3. rehearsal on CUDA"
left=$(( ${DEADLINE:-560} - SECONDS )); echo "rehearsal gets ${left}s"
timeout "$(( left > 60 ? left : 60 ))" python3 -m gemma_assets.cli preflight --config gemma-2-2b --offline-standins \
  --points 1 --set clustering.max_iter=1 --set clustering.seeding=random --set density.max_iter=1 \
  --set evaluation.logit_effect_features=64 --data-root /tmp/rehearsal --json "$out/rehearsal_gemma-2-2b_cuda.json" \
  > "$out/rehearsal_gemma-2-2b_cuda.log" 2>&1
echo "rehearsal rc=$?"; tail -30 "$out/rehearsal_gemma-2-2b_cuda.log"
