#!/bin/bash
# gpu.sh: the CUDA backend's checks and timings in one go on a GPU machine (one `run` call there):
# configures with -DM3_CUDA=ON for sm_90a, builds, runs every op against the CPU backend
# (tests/gpu/test_cuda_ops.c), the committed text fixtures through `m3 logits --device cuda`,
# the vision tower on the committed vision fixtures and its timings at full width
# (tests/gpu/test_cuda_vision.c), `m3 run` speed on the CPU and the GPU, the kernel timings
# (tests/gpu/bench_cuda_ops.c) and the whole-model benchmarks (scripts/gpu-bench.sh; skipped with
# M3_GPU_QUICK=1). Logs and results.md go to $OUT (else ./gpu-out); the summary prints last. Exits
# non-zero when a check fails.
#
# The build needs libcjson, libpcre2 and libmicrohttpd (Debian packages). Where the machine lacks them, .debs
# carried in .gpudeps/ (apt-get download pkgconf pkgconf-bin libpkgconf3 libcjson1 libcjson-dev
# libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libmicrohttpd12
# libmicrohttpd-dev) are unpacked under /tmp.
set -u
src=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$src/gpu-out}
build=${BUILD:-$src/build-gpu}
mkdir -p "$out"

. "$src/scripts/gpudeps.sh"

nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/card.txt" 2>&1
# M3_PREBUILT=1: BUILD already holds m3, tests/test_cuda_ops, tests/test_cuda_vision, tests/test_p2p
# and tests/bench_cuda_ops, built for sm_90a on another machine with the same CUDA major version (saves
# the device minutes of nvcc).
if [ -n "${M3_PREBUILT:-}" ]; then
  echo "prebuilt binaries in $build" > "$out/build.log"
elif ! cmake -S "$src" -B "$build" -G Ninja -DM3_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DCMAKE_CUDA_ARCHITECTURES=90a -DM3_MEDIA=OFF > "$out/configure.log" 2>&1; then
  tail -n 30 "$out/configure.log"
  exit 1
fi
if [ -n "${M3_PREBUILT:-}" ]; then
  [ -x "$build/m3" ]
  m3_built=$?
else
  if ! ninja -C "$build" test_cuda_ops bench_cuda_ops test_cuda_vision test_p2p > "$out/build.log" 2>&1; then
    tail -n 40 "$out/build.log"
    exit 1
  fi
  ninja -C "$build" m3 >> "$out/build.log" 2>&1
  m3_built=$?
fi

# Bounded: a kernel that hangs must not eat the device call; the log names the group it was in.
# M3_SOURCE_DIR: the committed fixtures its step-graph check loads (binaries may come prebuilt).
M3_SOURCE_DIR=$src timeout 300 stdbuf -oL -eL "$build/tests/test_cuda_ops" > "$out/ops.log" 2>&1
ops_rc=$?
[ $ops_rc -eq 124 ] && echo "TIMEOUT after 300 s in group: $(grep '^-- ' "$out/ops.log" | tail -n 1)" >> "$out/ops.log"

# The peer-to-peer all-reduce of several ranks (tests/gpu/test_p2p.c): 2 and 4 ranks sharing the
# machine's GPUs (one will do).
if [ -x "$build/tests/test_p2p" ]; then
  timeout 120 stdbuf -oL -eL "$build/tests/test_p2p" > "$out/p2p.log" 2>&1
  p2p_rc=$?
  [ $p2p_rc -eq 124 ] && echo "TIMEOUT after 120 s in: $(grep '^   ' "$out/p2p.log" | tail -n 1)" >> "$out/p2p.log"
else
  echo "p2p: $build/tests/test_p2p was not built" > "$out/p2p.log"
  p2p_rc=1
fi

# Fixtures: logits of every committed text model on the GPU against transformers' (rel L2 per
# position <= 1e-2, >= 99% same argmax), all tokens in one forward (chunk 256) and one token per
# forward (chunk 1, the decode path). Block selections must be identical, except rows (layer,
# token, index head) of a fixture whose closest selection tie (reference.json min_block_margin) is
# below 1e-4, which are counted as near-ties.
fixtures_rc=0
if [ $m3_built -ne 0 ]; then
  echo "fixtures: skipped, m3 did not build (see build.log)" > "$out/fixtures.log"
else
  python3 - "$build/m3" "$src/tests/fixtures/text" > "$out/fixtures.log" 2>&1 <<'EOF'
import json, os, subprocess, sys, tempfile
import numpy as np
m3, root = sys.argv[1], sys.argv[2]
failed = 0
print("| fixture | chunk | worst rel L2 | median rel L2 | positions > 1e-2 | argmax agree | "
      "selection rows differing | near-ties | result |")
print("|---|---|---|---|---|---|---|---|---|")
for name in sorted(os.listdir(root)):
    fx = os.path.join(root, name)
    if not os.path.exists(os.path.join(fx, "logits.f32")):
        continue
    ref = json.load(open(os.path.join(fx, "reference.json")))
    ids = ref["ids"]
    want = np.fromfile(os.path.join(fx, "logits.f32"), np.float32).reshape(len(ids), -1)
    ref_blocks = np.fromfile(os.path.join(fx, "blocks.i32"), np.int32)
    margin = ref.get("min_block_margin")
    for chunk in (256, 1):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [m3, "logits", "--model", fx, "--ids", ",".join(map(str, ids)), "--device", "cuda",
                   "--chunk", str(chunk), "--out", tmp + "/l.f32", "--blocks-out", tmp + "/b.i32"]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except subprocess.TimeoutExpired:
                r = subprocess.CompletedProcess(cmd, 124, "", "timed out after 120 s")
            if r.returncode != 0:
                print(f"| {name} | {chunk} | - | - | - | - | - | - | FAIL: {r.stderr.strip()[:200]} |")
                failed += 1
                continue
            got = np.fromfile(tmp + "/l.f32", np.float32).reshape(len(ids), -1)
            blocks = np.fromfile(tmp + "/b.i32", np.int32)
        rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        agree = float(np.mean(got.argmax(1) == want.argmax(1)))
        ok = bool(rel.max() <= 1e-2) and agree >= 0.99
        if ref_blocks.size == 0:
            rows, near = "- (no sparse layer)", "-"
        elif blocks.size != ref_blocks.size:
            rows, near, ok = f"size {blocks.size} vs {ref_blocks.size}", "-", False
        else:
            k = ref["topk"]
            diff = int(np.any(blocks.reshape(-1, k) != ref_blocks.reshape(-1, k), axis=1).sum())
            tie = margin is not None and margin < 1e-4
            rows, near = f"{diff} of {ref_blocks.size // k}", (diff if tie else 0)
            ok = ok and (diff == 0 or tie)
        failed += not ok
        print(f"| {name} | {chunk} | {rel.max():.2e} | {np.median(rel):.2e} | {int((rel > 1e-2).sum())} of "
              f"{len(ids)} | {agree:.1%} | {rows} | {near} | {'PASS' if ok else 'FAIL'} |")
sys.exit(1 if failed else 0)
EOF
  fixtures_rc=$?
fi

# Vision tower: the committed tiny vision checkpoint on the GPU against the fixtures' embeddings
# and the CPU (fails the run), then the tower's timings at the real M3 vision width (figures).
if [ -x "$build/tests/test_cuda_vision" ]; then
  timeout 120 stdbuf -oL -eL "$build/tests/test_cuda_vision" "$src" > "$out/vision.log" 2>&1
  vision_rc=$?
  [ $vision_rc -eq 124 ] && echo "TIMEOUT after 120 s" >> "$out/vision.log"
else
  echo "vision: $build/tests/test_cuda_vision was not built" > "$out/vision.log"
  vision_rc=1
fi

# End to end: `m3 run` speed, greedy, 64 prompt ids then up to 256 generated, on the CPU and the
# GPU. Tiny models only: `m3 tiny` takes a layer plan but no width options, so no full-width model
# can be generated (issue 7's benchmark 4 needs one).
run_rc=0
if [ $m3_built -eq 0 ]; then
  "$build/m3" tiny "$out/deep" --layers FD,FM,SM,SM,SM,SM,SM,SM,SM,SM,SM,SM,SM,SM,SM,SM \
    > /dev/null 2>&1
  prompt=$(seq -s, 1 64)
  {
    echo "| model | device | prompt tokens/s | generated | decode tokens/s |"
    echo "|---|---|---|---|---|"
    for model in builtin deep16; do
      margs=()
      [ $model = deep16 ] && margs=(--model "$out/deep")
      for dev in cpu cuda; do
        log=$(timeout 120 "$build/m3" run "${margs[@]}" --device $dev --ids "$prompt" --max-tokens 256 \
              2>&1 >/dev/null)
        line=$(echo "$log" | grep '^prompt:') ||
          { run_rc=1; line="| $model | $dev | failed: $(echo "$log" | tail -n 1) | | |"; }
        echo "$line" | sed -E "s#^prompt: [0-9]+ tokens in [0-9.]+ s \(([0-9.]+) tokens/s\); generation: ([0-9]+) tokens in [0-9.]+ s \(([0-9.]+) tokens/s\)\$#| $model | $dev | \1 | \2 | \3 |#"
      done
    done
  } > "$out/run.md" 2>&1
  rm -rf "$out/deep"
fi

# The trained built-in model (issue 14) on the GPU: perplexity of the held-out file against the
# CPU's (transformers gives the CPU's, tests/test_engine_small_model.c), with float32 and fp8 KV
# caches, and greedy speculative
# decoding with its MTP module and EAGLE3 draft, which must leave every output unchanged.
small_rc=1
if [ $m3_built -eq 0 ]; then
  heldout="$src/tests/fixtures/m3-small/heldout.txt"
  {
    for dev in cpu cuda; do
      for kv in f32 fp8; do
        echo "perplexity ($dev, $kv cache): $("$build/m3" perplexity --device "$dev" --kv-dtype $kv --file "$heldout" 2>&1)"
      done
    done
    echo
    timeout 200 "$build/m3" bench accept --device cuda --file "$heldout" --prompts 8 --gen-tokens 64 2>&1
  } > "$out/small.log"
  small_rc=$?
fi

timeout 240 stdbuf -oL -eL "$build/tests/bench_cuda_ops" "$out/bench.md" > "$out/bench.log" 2>&1
bench_rc=$?

# Whole-model benchmarks at full M3 width (issue 7's 1, 3 and 4, against transformers), unless
# M3_GPU_QUICK is set: they write tens of GB of random checkpoints first.
model_bench_rc=0
if [ $m3_built -eq 0 ] && [ -z "${M3_GPU_QUICK:-}" ]; then
  OUT="$out" BUILD="$build" "$src/scripts/gpu-bench.sh" > "$out/gpu-bench.log" 2>&1
  model_bench_rc=$?
fi

{
  echo "# CUDA backend checks and timings"
  echo "card: $(cat "$out/card.txt")"
  echo
  echo "## ops against the CPU backend (exit $ops_rc)"
  sed -n '/^op /,$p' "$out/ops.log"
  grep -E '^(FAIL|FATAL)' "$out/ops.log" | head -n 20
  echo
  echo "## peer-to-peer all-reduce (exit $p2p_rc)"
  grep -v '^   ' "$out/p2p.log"
  echo
  echo "## fixtures (exit $fixtures_rc)"
  cat "$out/fixtures.log"
  echo
  echo "## vision tower (exit $vision_rc)"
  grep -v '^   ' "$out/vision.log"
  echo
  echo "## m3 run, end to end (exit $run_rc)"
  cat "$out/run.md" 2>/dev/null
  echo
  echo "## trained built-in model: perplexity, drafter acceptance, greedy identity (exit $small_rc)"
  cat "$out/small.log" 2>/dev/null
  echo
  echo "## timings (exit $bench_rc)"
  cat "$out/bench.md" 2>/dev/null
  [ $bench_rc -ne 0 ] && tail -n 5 "$out/bench.log"
  if [ -z "${M3_GPU_QUICK:-}" ]; then
    echo
    echo "## whole-model benchmarks (exit $model_bench_rc)"
    cat "$out/bench-gpu.md" 2>/dev/null || tail -n 20 "$out/gpu-bench.log"
  fi
} > "$out/results.md"
cat "$out/results.md"
[ $ops_rc -eq 0 ] && [ $p2p_rc -eq 0 ] && [ $fixtures_rc -eq 0 ] && [ $vision_rc -eq 0 ] && [ $run_rc -eq 0 ] && [ $small_rc -eq 0 ] &&
  [ $bench_rc -eq 0 ] &&
  [ $model_bench_rc -eq 0 ]
