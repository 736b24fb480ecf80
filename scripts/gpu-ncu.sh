#!/bin/bash
# gpu-ncu.sh: hardware counters of the decode kernels of one full-width MoE + MSA layer (m3 tiny
# --layers SM, BF16 and MXFP8), through Nsight Compute on the device machine: memory throughput
# against the DRAM peak, achieved occupancy and the warp stall reasons of the GEMVs, the grouped
# expert kernels and the MSA kernels at batch 1. Uses the m3 of BUILD; writes $OUT/ncu-*.txt.
set -u
src=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$src/gpu-out}
m3=${BUILD:-$src/build-gpu}/m3
mkdir -p "$out"
[ -d /tmp/m3-gpudeps ] && export LD_LIBRARY_PATH=/tmp/m3-gpudeps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
[ -n "$ncu" ] || { echo "gpu-ncu: no ncu" > "$out/ncu-none.txt"; exit 1; }
for dtype in ${NCU_DTYPES:-bf16 mxfp8}; do
  dir=/dev/shm/m3-ncu-$dtype
  "$m3" tiny "$dir" --layers SM --vocab 4096 --no-vision --hidden 6144 --heads 64 --kv-heads 4 \
    --head-dim 128 --rotary-dim 64 --experts 128 --experts-per-token 4 --expert-width 3072 \
    --shared-width 3072 --dense-width 12288 --index-dim 128 --block-size 128 --topk-blocks 16 \
    --dtype "$dtype" --no-mtp > "$out/ncu-write-$dtype.log" 2>&1 || continue
  # The first NCU_COUNT kernels: a 16-token prefill, then decode steps.
  timeout 240 "$ncu" --clock-control none --launch-skip ${NCU_SKIP:-0} --launch-count ${NCU_COUNT:-150} \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section WarpStateStats --section LaunchStats \
    "$m3" bench model --device cuda --model "$dir" --batch 1 --decode 3 --prefill 16 --ctx 16 \
    > "$out/ncu-$dtype.txt" 2>&1
  rm -rf "$dir"
done
