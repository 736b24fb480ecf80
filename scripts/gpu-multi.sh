#!/bin/bash
# gpu-multi.sh: the NCCL collectives on every GPU of a multi-GPU machine in one go (one `run` call
# there): tests/gpu/test_nccl checks all-reduce, all-gather and broadcast against host references,
# the tensor-parallel matmul against the single-GPU one, the refusals and the abort of a
# collective a peer never joins, and times all-reduce at decode sizes; then tests/gpu/test_tp
# runs the tensor-parallel model (TP 2 over NCCL) against the whole model on one GPU and times
# both. Logs, nccl.md and tp.md (the checks and the timing tables for bench/RESULTS.md) go to
# $OUT (else ./gpu-out); the summaries print last. Exits with test_nccl's status, else
# test_tp's: 0 pass, 1 failure, 77 fewer than 2 GPUs, 124 hang.
#
# NCCL there lives only in the torch venv (NCCL_DIR, default below; libnccl.so.2 and nccl.h):
# it goes on LD_LIBRARY_PATH, and NCCL_NVLS_ENABLE=0 keeps NVLink multicast off.
# M3_PREBUILT=1: BUILD (default build-gpu) already holds tests/test_nccl and tests/test_tp,
# built on another machine for sm_90a with CUDA 13 and NCCL found (their run-time needs:
# libcudart.so.13 and libcublasLt.so.13 of the machine's CUDA, libnccl.so.2 from NCCL_DIR, and
# for test_tp libcjson.so.1, from .gpudeps/ when the machine lacks it). Otherwise this configures
# and builds them here; the build needs the Debian packages scripts/gpu.sh lists, taken from
# .gpudeps/ as gpu.sh does when the machine lacks them.
set -u
src=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$src/gpu-out}
build=${BUILD:-$src/build-gpu}
nccl_dir=${NCCL_DIR:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl}
mkdir -p "$out"

export NCCL_NVLS_ENABLE=0
export LD_LIBRARY_PATH=$nccl_dir/lib:${LD_LIBRARY_PATH:-}
# NCCL's own account of the run (version, transports, algorithms) beside the logs.
export NCCL_DEBUG=${NCCL_DEBUG:-INFO} NCCL_DEBUG_FILE=${NCCL_DEBUG_FILE:-$out/nccl-debug.%p.log}

{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  nvidia-smi topo -m
  ls -l "$nccl_dir/lib"
} > "$out/card.txt" 2>&1

# Also for prebuilt binaries: test_tp links libcjson.so.1 (the model's config reader).
if ! pkg-config --exists libcjson libpcre2-8 libmicrohttpd 2>/dev/null; then
  deps=/tmp/m3-gpudeps
  for f in "$src"/.gpudeps/*.deb; do dpkg -x "$f" "$deps"; done
  printf 'Name: gnutls\nDescription: the system runtime\nVersion: 3.8.0\n' \
    > "$deps/usr/lib/x86_64-linux-gnu/pkgconfig/gnutls.pc"
  export PATH=$deps/usr/bin:$PATH CPATH=$deps/usr/include
  export LD_LIBRARY_PATH=$deps/usr/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH
  export PKG_CONFIG_SYSROOT_DIR=$deps
  export PKG_CONFIG_LIBDIR=$deps/usr/lib/x86_64-linux-gnu/pkgconfig:$deps/usr/share/pkgconfig
fi
if [ -n "${M3_PREBUILT:-}" ]; then
  echo "prebuilt binaries in $build" > "$out/build.log"
else
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  if ! cmake -S "$src" -B "$build" -G Ninja -DM3_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" \
      -DCMAKE_CUDA_ARCHITECTURES=90a -DM3_MEDIA=OFF -DM3_NCCL_ROOT="$nccl_dir" \
      > "$out/configure.log" 2>&1 || ! ninja -C "$build" test_nccl test_tp > "$out/build.log" 2>&1; then
    tail -n 30 "$out/configure.log" "$out/build.log" 2>/dev/null
    exit 1
  fi
fi
ldd "$build/tests/test_nccl" "$build/tests/test_tp" > "$out/ldd.txt" 2>&1

# Bounded: a collective that hangs must not eat the device call; the log names the case.
timeout 300 stdbuf -oL -eL "$build/tests/test_nccl" > "$out/nccl.log" 2>&1
rc=$?
[ $rc -eq 124 ] &&
  echo "TIMEOUT after 300 s in: $(grep '^   ' "$out/nccl.log" | tail -n 1)" >> "$out/nccl.log"

{
  echo "# NCCL collectives (test_nccl, exit $rc)"
  echo "card: $(head -n 8 "$out/card.txt")"
  echo "NCCL: $(grep -h -o 'NCCL version [^ ]*' "$out"/nccl-debug.*.log 2>/dev/null | head -n 1)"
  echo "libnccl: $(grep libnccl "$out/ldd.txt")"
  echo
  grep -v -E '^(   |FAIL|FATAL|TIMEOUT)' "$out/nccl.log"
  grep -E '^(FAIL|FATAL|TIMEOUT)' "$out/nccl.log" | head -n 20
} > "$out/nccl.md"
cat "$out/nccl.md"

timeout 300 stdbuf -oL -eL "$build/tests/test_tp" > "$out/tp.log" 2>&1
tp_rc=$?
[ $tp_rc -eq 124 ] &&
  echo "TIMEOUT after 300 s in: $(grep '^   ' "$out/tp.log" | tail -n 1)" >> "$out/tp.log"
{
  echo "# Tensor-parallel model (test_tp, exit $tp_rc)"
  echo
  grep -v -E '^(   |FAIL|FATAL|TIMEOUT)' "$out/tp.log"
  grep -E '^(FAIL|FATAL|TIMEOUT)' "$out/tp.log" | head -n 20
} > "$out/tp.md"
cat "$out/tp.md"
[ $rc -eq 0 ] && rc=$tp_rc
exit $rc
