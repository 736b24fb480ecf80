#!/usr/bin/env bash
# m3 bench: the dispatcher (every part reachable, bad parts and options rejected) and
# `m3 bench model` on a tiny checkpoint: its weight accounting against m3 inspect's independent
# parameter arithmetic (all text weights; one decode token = active layers + one embedding row +
# lm_head), and a table with both decode and both prefill rows. Figures are not checked: this is
# not a timed test. Needs jq.
#   $1: the m3 binary  $2: the source tree
set -uo pipefail
m3=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*" >&2; }
expect_eq() { # name actual expected
  if [ "$2" = "$3" ]; then ok; else bad "$1: got '$2', expected '$3'"; fi
}
# Runs m3 with the remaining args; it must exit 2 with one stderr line containing $1.
expect_input_error() {
  local needle=$1
  shift
  local err rc
  err=$("$m3" "$@" 2>&1 >/dev/null)
  rc=$?
  if [ "$rc" -eq 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] && [[ "$err" == *"$needle"* ]]; then
    ok
  else
    bad "m3 $*: exit $rc, stderr '$err' (expected exit 2 and one line naming '$needle')"
  fi
}

# ---- dispatch ----
"$m3" bench >/dev/null 2>&1
expect_eq "m3 bench with no part exits" "$?" 2
out=$("$m3" bench --help)
for part in ops model engine tok serve; do
  if [[ "$out" == *"  $part "* ]]; then ok; else bad "m3 bench --help does not list '$part': $out"; fi
  "$m3" bench "$part" --help >/dev/null
  expect_eq "m3 bench $part --help exits" "$?" 0
done
err=$("$m3" bench nope 2>&1 >/dev/null)
expect_eq "m3 bench nope exits" "$?" 2
if [[ "$err" == "m3 bench: unknown benchmark 'nope'"* ]]; then ok; else bad "m3 bench nope: '$err'"; fi
for old in bench-ops bench-engine bench-tok; do
  "$m3" "$old" >/dev/null 2>&1
  expect_eq "the old command $old is gone" "$?" 2
done
out=$("$m3" bench serve)
if [[ "$out" == *"node bench/serve_bench.mjs --url"* ]]; then ok; else bad "m3 bench serve: '$out'"; fi
expect_input_error "m3 bench ops: bad option" bench ops --gemv 0x5
expect_input_error "m3 bench model: --dtype 'f8'" bench model --dtype f8
expect_input_error "m3 bench model: --decode '0'" bench model --decode 0
expect_input_error "m3 bench model: unknown option '--bogus'" bench model --bogus 1
expect_input_error "m3 bench model: $tmp/none/config.json" bench model --model "$tmp/none"
expect_input_error "m3 bench engine: unknown option '--bogus'" bench engine --bogus 1

# ---- m3 tiny size flags: inconsistent sizes name the options ----
expect_input_error "--heads 6 is not a multiple of --kv-heads 4" tiny "$tmp/x" --heads 6 --kv-heads 4
expect_input_error "--expert-width '0'" tiny "$tmp/x" --expert-width 0
if [ ! -e "$tmp/x" ]; then ok; else bad "m3 tiny wrote $tmp/x despite bad sizes"; fi

# ---- m3 bench model on a tiny checkpoint ----
"$m3" tiny "$tmp/tiny" --layers FD,SM,FM,SD >/dev/null || bad "m3 tiny failed"
js=$("$m3" inspect --model "$tmp/tiny" --json)
out=$("$m3" bench model --model "$tmp/tiny" --threads 1 --ctx 40 --prefill 24 --decode 4 --copy-mib 8)
expect_eq "m3 bench model exits" "$?" 0
total=$(sed -n 's/^  weights: .* MB (\([0-9]*\) parameters); read.*/\1/p' <<<"$out")
decode=$(sed -n 's/.*read per decode token: .* MB (\([0-9]*\) parameters)$/\1/p' <<<"$out")
expect_eq "text parameters" "$total" "$(jq .params_text <<<"$js")"
expect_eq "parameters read per decode token" "$decode" "$(jq .params_active_with_embeddings <<<"$js")"
# Rows: phase, positions, tokens, then figures.
expect_eq "decode at the short context" "$(awk '$1 == "decode" && $2 == "16..20" {print $3}' <<<"$out")" 4
expect_eq "prefill from empty" "$(awk '$1 == "prefill" && $2 == "0..24" {print $3}' <<<"$out")" 24
expect_eq "prefill on to --ctx" "$(awk '$1 == "prefill" && $2 == "24..40" {print $3}' <<<"$out")" 16
expect_eq "decode at --ctx" "$(awk '$1 == "decode" && $2 == "40..44" {print $3}' <<<"$out")" 4
positive=$(awk '($1 == "decode" || $1 == "prefill") && $5 > 0 {n++} END {print n + 0}' <<<"$out")
expect_eq "rows with tokens/s > 0" "$positive" 4
if [[ "$out" == *"copy bandwidth, 1 thread: "*" GB/s (read + written, 2 x 8 MiB)"* ]]; then ok; else bad "no copy bandwidth: $out"; fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
