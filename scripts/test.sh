#!/usr/bin/env bash
# Builds m3 and runs the whole test suite.
#   scripts/test.sh              release build in build/
#   scripts/test.sh --sanitize   AddressSanitizer + UBSan build in build-asan/
#   scripts/test.sh --tsan       ThreadSanitizer build in build-tsan/: only the tests with threads
#                                (engine and scheduler, server), since TSan slows code ~10x
set -euo pipefail
cd "$(dirname "$0")/.."
dir=build
flags=()
targets=()
only=
case "${1:-}" in
  --sanitize)
    dir=build-asan
    flags=(-DM3_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo)
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    ;;
  --tsan)
    dir=build-tsan
    # CPU only: the CUDA backend is not what runs here, and nvcc's build time is not spent.
    flags=(-DM3_TSAN=ON -DM3_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo)
    # A race makes the process exit 66 at its end (the tests check exit codes), after reporting
    # every race it saw rather than only the first.
    export TSAN_OPTIONS=halt_on_error=0:exitcode=66:second_deadlock_stack=1
    # Only the tests where threads meet: the engine's loop thread against client threads, and
    # m3 serve (connection threads, the engine loop, the CPU thread pool), and the ranks of one
    # process (a thread per rank, host all-reduce barriers). The other tests run one
    # thread (m3_engine_step, a one-thread pool), where TSan finds nothing and costs ~10x.
    only='^(test_engine_threads|test_engine_ranks|cli_serve_.*)$'
    targets=(m3 test_engine_threads test_engine_ranks)
    ;;
esac
scripts/fetch-test-data.sh
cmake -S . -B "$dir" -G Ninja "${flags[@]}" >/dev/null
cmake --build "$dir" ${targets[@]+--target "${targets[@]}"}
ctest --test-dir "$dir" --output-on-failure -j "$(nproc)" ${only:+-R "$only"}
