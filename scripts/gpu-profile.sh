#!/bin/bash
# gpu-profile.sh: where the time of a full-width step goes on the GPU, op by op (m3 bench model
# --profile), for a 2-layer model (FD,SM: one dense full-attention layer and one MoE + MSA layer
# at M3's width, vocab 4096), decode at batch 1 and 8 and a prefill of PREFILL tokens (default
# 8192). Uses the m3 of BUILD (default build-gpu); writes $OUT/profile-*.log (else ./gpu-out).
set -u
src=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$src/gpu-out}
m3=${BUILD:-$src/build-gpu}/m3
mkdir -p "$out"
[ -d /tmp/m3-gpudeps ] && export LD_LIBRARY_PATH=/tmp/m3-gpudeps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
dir=/dev/shm/m3-profile-$$
"$m3" tiny "$dir" --layers FD,SM --vocab 4096 --no-vision --hidden 6144 --heads 64 --kv-heads 4 \
  --head-dim 128 --rotary-dim 64 --experts 128 --experts-per-token 4 --expert-width 3072 \
  --shared-width 3072 --dense-width 12288 --index-dim 128 --block-size 128 --topk-blocks 16 \
  --dtype bf16 --no-mtp > "$out/profile-write.log" 2>&1 || { cat "$out/profile-write.log"; exit 1; }
p=${PREFILL:-8192}
timeout 120 "$m3" bench model --device cuda --model "$dir" --profile --batch 1 --decode 8 \
  --prefill "$p" --ctx "$p" > "$out/profile-b1.log" 2>&1
timeout 60 "$m3" bench model --device cuda --model "$dir" --profile --batch 8 --decode 4 \
  --prefill 16 --ctx 16 > "$out/profile-b8.log" 2>&1
rm -rf "$dir"
cat "$out"/profile-b1.log "$out"/profile-b8.log
