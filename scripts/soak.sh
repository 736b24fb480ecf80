#!/usr/bin/env bash
# Soak test of `m3 serve` on loopback: random mixed requests for a bounded time and count (OpenAI
# chat and completions, Anthropic messages, streamed and not, tool calls and thinking, random
# sampling, short and long generations, clients hanging up mid-stream, invalid requests), the
# server's resident memory and KV pages sampled as it runs (tests/js/soak.mjs). Passes only with
# no 5xx, every KV page free at the end, flat memory, and a clean exit on SIGTERM.
#   scripts/soak.sh [--m3 BIN] [--model DIR] [--minutes N | --seconds N] [--concurrency N]
#                   [--max-requests N] [--sample-seconds N] [--seed N] [--kv-memory MIB]
# Defaults: build/m3, a tiny model from `m3 tiny` (tests/js/with_server.sh), 30 minutes, 200000
# requests, 8 clients, a sample every 10 s, a random seed (printed, to replay a run), a 32 MiB KV
# cache.
# The KV pool is touched page by page as the prefix cache keeps freed pages and new requests take
# untouched ones, so resident memory rises until the whole pool is in use. A small pool is in use
# within the first minutes (and prefix-cache eviction and preemption run under the load); a
# default-sized one (hundreds of MiB) would look like a leak for most of the run.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
m3=$src/build/m3
model=()
kv_mib=32
export SOAK_SECONDS=1800 SOAK_MAX_REQUESTS=200000 SOAK_CONCURRENCY=8 SOAK_SAMPLE_SECONDS=10
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "soak.sh: $1 needs a value" >&2; exit 2; }
  case $1 in
    --m3) m3=$2 ;;
    --model) model=(--model "$2") ;;
    --minutes) SOAK_SECONDS=$(($2 * 60)) ;;
    --seconds) SOAK_SECONDS=$2 ;;
    --concurrency) SOAK_CONCURRENCY=$2 ;;
    --max-requests) SOAK_MAX_REQUESTS=$2 ;;
    --sample-seconds) SOAK_SAMPLE_SECONDS=$2 ;;
    --seed) export SOAK_SEED=$2 ;;
    --kv-memory) kv_mib=$2 ;;
    *) echo "soak.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
# --max-body 65536: the soak's oversized body (70 kB) gets 413 without sending megabytes.
exec bash "$src/tests/js/with_server.sh" "$m3" "$src" soak.mjs --test-hooks --max-body 65536 --kv-memory "$kv_mib" \
  "${model[@]}"
