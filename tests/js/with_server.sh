#!/usr/bin/env bash
# with_server.sh M3 SRC SCRIPT [server flags...]: starts `m3 serve --port 0 FLAGS` on loopback
# with a tiny model from `m3 tiny` (vision tower included) unless FLAGS give --model, runs
# `node tests/js/SCRIPT URL PID`, sends SIGTERM (the script may have sent it already) and passes
# only if every check passed and the server exited 0 (under ASan that includes no leak at exit).
# Prints "N passed, N failed".
set -u
m3=$1 src=$2 script=$3
shift 3
js="$src/tests/js"
if [ ! -d "$js/node_modules/openai" ] || [ ! -d "$js/node_modules/@anthropic-ai/sdk" ]; then
  echo "tests/js/node_modules is missing: run 'npm ci --prefix tests/js'"
  echo "0 passed, 1 failed"
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
model=()
if [[ " $* " != *" --model "* ]]; then
  # Named m3-builtin: the scripts ask for that model, the engine names a model by its folder.
  "$m3" tiny "$tmp/m3-builtin" >/dev/null || { echo "m3 tiny failed"; echo "0 passed, 1 failed"; exit 1; }
  model=(--model "$tmp/m3-builtin")
fi
"$m3" serve --port 0 "${model[@]}" "$@" >"$tmp/out" 2>"$tmp/err" &
pid=$!
url=
for _ in $(seq 600); do # up to 60 s: loading is slow under sanitizers
  url=$(sed -n 's/^listening on \(http:.*\)$/\1/p' "$tmp/out")
  [ -n "$url" ] && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$url" ]; then
  cat "$tmp/err"
  kill -KILL "$pid" 2>/dev/null
  echo "the server did not start"
  echo "0 passed, 1 failed"
  exit 1
fi
node "$js/$script" "$url" "$pid" | tee "$tmp/node"
summary=$(tail -n 1 "$tmp/node")
passed=$(sed -n 's/.* \([0-9]*\) passed, \([0-9]*\) failed$/\1/p' <<<"$summary")
failed=$(sed -n 's/.* \([0-9]*\) passed, \([0-9]*\) failed$/\2/p' <<<"$summary")
[ -z "$passed" ] && passed=0 failed=1
kill -TERM "$pid" 2>/dev/null
for _ in $(seq 300); do # the drain may take up to 30 s; then it has hung
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
kill -KILL "$pid" 2>/dev/null
wait "$pid"
status=$?
if [ "$status" -eq 0 ]; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
  echo "FAIL the server exited with status $status after SIGTERM:"
  tail -n 30 "$tmp/err"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
