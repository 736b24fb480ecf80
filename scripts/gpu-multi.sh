#!/bin/bash
# gpu-multi.sh: issue 11's checks and benchmark on a machine with 2 GPUs, in one device call:
#   1. tests/gpu/test_nccl   all-reduce, all-gather and broadcast against host references, the
#                            row-split matmul against the one-GPU one, refusals, the abort of a
#                            collective a peer never joins; all-reduce timings at decode sizes,
#                            NCCL against peer to peer; tests/gpu/test_p2p: the peer-to-peer
#                            all-reduce (backend/cuda/p2p.h) with a rank per GPU, then 4 sharing;
#   2. m3 tiny               a full-width few-layer model (FD,SM,SM at M3 width, vocab 200064, no
#                            vision, no MTP; ~35 GB) into /dev/shm when it has room, else /tmp;
#   3. tests/gpu/test_tp     TP2 and EP2 against the whole model on one GPU, on the committed
#                            fixtures and on that model, and with the all-reduces recorded in CUDA
#                            graphs against without (PASS / FAIL / SKIP per case);
#   4. m3 run over 2 GPUs    --tp 2 / --ep 2 in one process against one GPU (engine), then two
#                            processes as two nodes of one engine (--nnodes 2: node 1 on cuda:1 in
#                            the background, node 0 on cuda:0) against the one-process text (nodes);
#   5. tests/gpu/bench_tp    on that model: decode steps at batch 1, 8, 64 and an 8192-token
#                            prefill on 1 GPU, TP2 and EP2, graphs on and off, scaling efficiency,
#                            time in collectives per layer; twice: every all-reduce through NCCL,
#                            then through the peer-to-peer all-reduce where it fits (M3_P2P=1, as
#                            the engine runs them).
# Writes $OUT/multi.md (the summaries and tables, for bench/RESULTS.md; else ./gpu-out) and
# $OUT/multi-logs.tar.gz (every log: card, build, each stage's output, NCCL's own debug logs),
# two files in all; prints multi.md last. Exits with the first failing of test_nccl, test_tp, the
# m3 run checks (engine, nodes) and bench_tp: 0 pass, 1 failure, 77 fewer than 2 GPUs, 124 a stage
# out of time.
#
# Time: the whole script stays under MULTI_BUDGET_S (default 540 s): each stage runs under
# `timeout` with the smaller of its own limit and what is left. Expected on 2 x H200 with 32 cores:
#   test_nccl, test_p2p                              ~30 s   (limits 90, 60 s)
#   m3 tiny, 35 GB                                   ~30-60 s (limit 120 s)
#   test_tp: fixtures, then 35 GB + 2 x 20 GB loads  ~60 s   (limit 150 s)
#   m3 run, one process (engine), failure injected   ~90 s   (limit 150 s)
#   m3 run as two nodes: 3 two-process runs + 3 refs ~60 s   (limit 120 s)
#   bench_tp, NCCL then p2p: the loads and timings   ~120 s  (limits 150 s each)
# Without the model (no room, or m3 tiny failed) test_tp runs on the fixtures alone and bench_tp
# is skipped.
#
# NCCL there lives only in the torch venv (NCCL_DIR, default below; libnccl.so.2 and nccl.h):
# it goes on LD_LIBRARY_PATH, and NCCL_NVLS_ENABLE=0 keeps NVLink multicast off.
# M3_MULTI_CHECKS_ONLY=1 skips the benchmark (stage 5).
# M3_PREBUILT=1: BUILD (default build-gpu) already holds m3, tests/test_nccl, tests/test_p2p,
# tests/test_tp and tests/bench_tp, built on another machine for sm_90a with CUDA 13 and NCCL found (their run-time
# needs: libcudart.so.13 and libcublasLt.so.13 of the machine's CUDA, libnccl.so.2 from NCCL_DIR,
# libcjson.so.1 from .gpudeps/ when the machine lacks it); the fixtures are read from this
# checkout (M3_SOURCE_DIR). Otherwise this configures and builds them here; the build needs the
# Debian packages scripts/gpu.sh lists, taken from .gpudeps/ as gpu.sh does when the machine
# lacks them.
set -u
src=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$src/gpu-out}
build=${BUILD:-$src/build-gpu}
nccl_dir=${NCCL_DIR:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl}
logs=$out/multi-logs
md=$out/multi.md
mkdir -p "$logs"
deadline=$(($(date +%s) + ${MULTI_BUDGET_S:-540}))

export NCCL_NVLS_ENABLE=0
export LD_LIBRARY_PATH=$nccl_dir/lib:${LD_LIBRARY_PATH:-}
# NCCL's own account of the run (version, transports, algorithms) beside the logs.
export NCCL_DEBUG=${NCCL_DEBUG:-INFO} NCCL_DEBUG_FILE=${NCCL_DEBUG_FILE:-$logs/nccl-debug.%p.log}
export M3_SOURCE_DIR=$src

{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  nvidia-smi topo -m
  ls -l "$nccl_dir/lib"
} > "$logs/card.txt" 2>&1

# Also for prebuilt binaries: they link libcjson.so.1 (the model's config reader).
. "$src/scripts/gpudeps.sh"

# Everything under $logs goes back as one archive; multi.md beside it.
finish() {
  tar czf "$out/multi-logs.tar.gz" -C "$logs" . && rm -rf "$logs"
  cat "$md"
  exit "$1"
}

if [ -n "${M3_PREBUILT:-}" ]; then
  echo "prebuilt binaries in $build" > "$logs/build.log"
else
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  if ! cmake -S "$src" -B "$build" -G Ninja -DM3_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" \
      -DCMAKE_CUDA_ARCHITECTURES=90a -DM3_MEDIA=OFF -DM3_NCCL_ROOT="$nccl_dir" \
      > "$logs/configure.log" 2>&1 ||
      ! ninja -C "$build" m3 test_nccl test_p2p test_tp bench_tp > "$logs/build.log" 2>&1; then
    { echo "# gpu-multi: the build failed"; echo '```'; tail -n 30 "$logs/configure.log" "$logs/build.log" 2>/dev/null; echo '```'; } > "$md"
    finish 1
  fi
fi
ldd "$build/m3" "$build/tests/test_nccl" "$build/tests/test_p2p" "$build/tests/test_tp" "$build/tests/bench_tp" \
  > "$logs/ldd.txt" 2>&1

# stage NAME LIMIT_S CMD... (scripts/stage.sh): logs to $logs/NAME.log, 10 s kept for the summary.
stage_budget=MULTI_BUDGET_S stage_margin=10 stage_logs=$logs stage_prefix= stage_list=$logs/stages.log
. "$src/scripts/stage.sh"

# The checks' and the benchmark's lines without the progress lines; failures last.
summary() {
  grep -v -E '^(   |FAIL|FATAL|TIMEOUT)' "$1"
  grep -E '^(FAIL|FATAL|TIMEOUT)' "$1" | head -n 30
}

: > "$logs/stages.log"
stage nccl 90 "$build/tests/test_nccl"
nccl_rc=$?
stage p2p 60 "$build/tests/test_p2p"
p2p_rc=$?

# The full-width model: ~35 GB.
model=""
for root in /dev/shm /tmp; do
  free_gb=$(($(df -Pk "$root" 2>/dev/null | awk 'NR == 2 {print $4}') / 1048576))
  if [ "$free_gb" -ge 40 ]; then
    model=$root/m3-multi-$$
    break
  fi
done
if [ -z "$model" ]; then
  echo "no room for the 35 GB model in /dev/shm or /tmp" > "$logs/tiny.log"
elif ! stage tiny 120 "$build/m3" tiny "$model" --layers FD,SM,SM --vocab 200064 --no-vision \
    --no-mtp --dtype bf16 --hidden 6144 --heads 64 --kv-heads 4 --head-dim 128 --rotary-dim 64 \
    --experts 128 --experts-per-token 4 --expert-width 3072 --shared-width 3072 \
    --dense-width 12288 --index-dim 128 --block-size 128 --topk-blocks 16; then
  rm -rf "$model"
  model=""
fi

stage tp 150 "$build/tests/test_tp" $model
tp_rc=$?

# The engine's ranks (src/engine/ranks.c): `m3 run --device cuda` with --tp 2 and with --ep 2
# greedy-generates the same text as one GPU, on the built-in model and on the full-width one, with
# the peer-to-peer all-reduces and recorded steps (M3_P2P=1), and on the built-in model with
# NCCL alone (M3_P2P=0). Then rank 1 failing in its third forward (M3_RANKS_FAIL=1:3), both ways:
# the run must end within its time, failing, with the injected failure named.
engine_check() {
  local ok=0 one out path m graphs
  # stdout without the layout plan (its first line, then its indented lines) and the timings (stderr)
  noplan() { awk 'NR == 1 && /^parallel layout: / {plan = 1; next} plan && /^  / {next} {plan = 0; print}'; }
  for path in "" $model; do
    m=${path:+--model $path}
    for kv in f32 fp8; do
      [ -n "$path" ] && [ $kv = fp8 ] && continue # the full-width loads take the stage's time
      one=$("$build/m3" run --device cuda $m --kv-dtype $kv --prompt "The capital of France is" \
            --max-tokens 48 --temperature 0 2>/dev/null) || { echo "FAIL one GPU ${m:-built-in}"; ok=1; continue; }
      for layout in "--tp 2" "--ep 2"; do
        out=$(M3_P2P=1 "$build/m3" run --device cuda $m --kv-dtype $kv $layout --prompt "The capital of France is" \
              --max-tokens 48 --temperature 0 2>"$logs/run.err" | noplan)
        # Peer to peer, the decode steps replay recorded CUDA graphs (m3 run's stderr says how many).
        graphs=$(grep -o 'steps from CUDA graphs: .*' "$logs/run.err")
        if [ "$out" = "$one" ] && [ -n "$graphs" ] && ! printf '%s' "$graphs" | grep -q ' 0 replayed'; then
          echo "PASS M3_P2P=1 m3 run $layout --kv-dtype $kv ${m:-(built-in model)}: same text as one GPU; $graphs"
        else echo "FAIL M3_P2P=1 m3 run $layout --kv-dtype $kv ${m:-(built-in model)}: '$out' vs one GPU '$one'; ${graphs:-no steps from CUDA graphs}"; ok=1; fi
        [ -n "$path" ] && continue
        out=$(M3_P2P=0 "$build/m3" run --device cuda --kv-dtype $kv $layout --prompt "The capital of France is" \
              --max-tokens 48 --temperature 0 2>/dev/null | noplan)
        if [ "$out" = "$one" ]; then echo "PASS M3_P2P=0 m3 run $layout --kv-dtype $kv (built-in model): same text as one GPU"
        else echo "FAIL M3_P2P=0 m3 run $layout --kv-dtype $kv (built-in model): '$out' vs one GPU '$one'"; ok=1; fi
      done
    done
  done
  local p2p err rc
  for p2p in 1 0; do
    err=$(M3_P2P=$p2p M3_RANKS_FAIL=1:3 timeout 60 "$build/m3" run --device cuda --tp 2 \
          --prompt "The capital of France is" --max-tokens 16 --temperature 0 2>&1 >/dev/null)
    rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && printf '%s' "$err" | grep -q "rank 1: failure injected"; then
      echo "PASS M3_P2P=$p2p, rank 1 failing mid-step: exit $rc, '$(printf '%s' "$err" | tail -n 1)'"
    else
      echo "FAIL M3_P2P=$p2p, rank 1 failing mid-step: exit $rc (124: hung), '$(printf '%s' "$err" | tail -n 2)'"
      ok=1
    fi
  done
  return $ok
}
export -f engine_check
export build model logs
stage engine 150 bash -c engine_check
engine_rc=$?

# Two processes as the two nodes of one engine (src/engine/node_link.h): node 1 follows in the
# background on its first GPU cuda:1, node 0 runs the prompt on cuda:0; node 0's text must be
# the one-process text of the same layout, and both must exit 0 (node 1 when node 0 quits).
# --tp 2 and --ep 2 on the built-in model, --tp 2 on the full-width one (its loads take longest).
nodes_check() {
  local ok=0 port=$((29600 + RANDOM % 2000)) one out path m layout rc0 rc1 pid name
  local prompt="The capital of France is"
  noplan() { awk 'NR == 1 && /^parallel layout: / {plan = 1; next} plan && /^  / {next} {plan = 0; print}'; }
  for path in "" $model; do
    m=${path:+--model $path}
    for layout in "--tp 2" "--ep 2"; do
      [ -n "$path" ] && [ "$layout" = "--ep 2" ] && continue
      name="$layout ${m:-(built-in model)}"
      # (The full-width model's random weights may well decode to no text: its exit says it ran.)
      one=$(timeout 60 "$build/m3" run --device cuda $m $layout --prompt "$prompt" --max-tokens 16 \
            --temperature 0 2>/dev/null | noplan; exit ${PIPESTATUS[0]}) ||
        { echo "FAIL two nodes $name: the one-process run failed"; ok=1; continue; }
      port=$((port + 1))
      timeout 90 "$build/m3" run --device cuda:1 $m $layout --nnodes 2 --node-rank 1 \
        --master-addr 127.0.0.1:$port > "$logs/node1-$port.log" 2>&1 &
      pid=$!
      timeout 90 "$build/m3" run --device cuda:0 $m $layout --nnodes 2 --node-rank 0 \
        --master-addr 127.0.0.1:$port --prompt "$prompt" --max-tokens 16 --temperature 0 \
        > "$logs/node0-$port.out" 2> "$logs/node0-$port.err"
      rc0=$?
      out=$(noplan < "$logs/node0-$port.out")
      wait $pid
      rc1=$?
      if [ "$rc0" -eq 0 ] && [ "$rc1" -eq 0 ] && [ "$out" = "$one" ]; then
        echo "PASS m3 run $layout --nnodes 2 ${m:-(built-in model)}: two processes give the one-process text"
      else
        echo "FAIL m3 run $layout --nnodes 2 ${m:-(built-in model)}: node 0 exit $rc0, node 1 exit $rc1; '$out' vs one process '$one'"
        tail -n 3 "$logs/node0-$port.err" "$logs/node1-$port.log" | sed 's/^/   /'
        ok=1
      fi
    done
  done
  return $ok
}
export -f nodes_check
export logs
stage nodes 120 bash -c nodes_check
nodes_rc=$?
bench_rc=0
if [ -n "${M3_MULTI_CHECKS_ONLY:-}" ]; then
  echo "bench_tp: skipped (M3_MULTI_CHECKS_ONLY)" | tee "$logs/bench.log" > "$logs/bench_p2p.log"
elif [ -n "$model" ]; then
  stage bench 150 "$build/tests/bench_tp" "$model"
  bench_rc=$?
  stage bench_p2p 150 env M3_P2P=1 "$build/tests/bench_tp" "$model"
  bench_p2p_rc=$?
  [ $bench_rc -eq 0 ] && bench_rc=$bench_p2p_rc
else
  echo "bench_tp: skipped, no full-width model (see tiny.log in the logs)" > "$logs/bench.log"
  cp "$logs/bench.log" "$logs/bench_p2p.log"
fi
rm -rf "$model"

{
  echo "# Multi-GPU checks and benchmark (scripts/gpu-multi.sh, issue 11)"
  echo
  echo "card: $(head -n 2 "$logs/card.txt" | tr '\n' ';')"
  echo "NCCL: $(grep -h -o 'NCCL version [^ ]*' "$logs"/nccl-debug.*.log 2>/dev/null | head -n 1)"
  echo "libnccl: $(grep -m 1 libnccl "$logs/ldd.txt")"
  echo
  echo "## NCCL collectives (test_nccl, exit $nccl_rc)"
  echo
  summary "$logs/nccl.log"
  echo
  echo "## Peer-to-peer all-reduce, one rank per GPU, then 4 ranks sharing them (test_p2p, exit $p2p_rc)"
  echo
  summary "$logs/p2p.log"
  echo
  echo "## TP2 and EP2 against 1 GPU (test_tp, exit $tp_rc)"
  echo
  summary "$logs/tp.log"
  echo
  echo "## m3 run over 2 GPUs (exit $engine_rc)"
  echo
  cat "$logs/engine.log"
  echo
  echo "## m3 run as two nodes, one process per GPU (exit $nodes_rc)"
  echo
  cat "$logs/nodes.log"
  echo
  echo "## Benchmark (bench_tp, exit $bench_rc)"
  echo
  summary "$logs/bench.log"
  echo
  echo "## Benchmark, peer-to-peer all-reduces (M3_P2P=1 bench_tp)"
  echo
  summary "$logs/bench_p2p.log"
  echo
  echo "## Stages"
  echo
  cat "$logs/stages.log"
  [ -f "$logs/tiny.log" ] && tail -n 3 "$logs/tiny.log"
} > "$md"

rc=$nccl_rc
[ $rc -eq 0 ] && rc=$p2p_rc
[ $rc -eq 0 ] && rc=$tp_rc
[ $rc -eq 0 ] && rc=$engine_rc
[ $rc -eq 0 ] && rc=$nodes_rc
[ $rc -eq 0 ] && rc=$bench_rc
finish $rc
