#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each for N seconds (default 60)
# over its committed seed corpus; new inputs go to a scratch copy, never into the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
CC=clang cmake -S . -B build-fuzz -G Ninja -DM3_FUZZ=ON -DM3_SANITIZE=ON -DM3_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
# Only the fuzz targets: the rest of the tree is built and tested by scripts/test.sh.
ninja -C build-fuzz $(ninja -C build-fuzz -t targets all | grep -o '^fuzz_[a-z0-9_]*' | sort -u)
for target in build-fuzz/tests/fuzz/fuzz_*; do
  [ -x "$target" ] || continue
  name=$(basename "$target")
  corpus=tests/fuzz/corpus/${name#fuzz_}
  work=$(mktemp -d)
  cp -r "$corpus"/. "$work"/ 2>/dev/null || true
  echo "-- $name: ${seconds}s"
  status=0
  ("$target" -max_total_time="$seconds" -print_final_stats=1 \
     -artifact_prefix="$work/" "$work" >"$work.log" 2>&1) || status=$?
  grep -E 'stat::(number_of_executed_units|new_units_added|peak_rss)|cov:' "$work.log" | tail -n 4
  if [ "$status" -ne 0 ]; then
    echo "fuzz finding in $name (exit $status):"; tail -n 40 "$work.log"; exit 1
  fi
  rm -rf "$work" "$work.log"
done
