#!/bin/bash
# m3 logits on a transformers fixture: token-by-token decode writes the same bytes as one prefill,
# the files have the documented sizes, and bad input exits 2 naming what is wrong.
m3=$1
src=$2
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { echo "FAIL: $*" >&2; fail=$((fail + 1)); }

root=$src/tests/fixtures/text
fx=$root/mixed_gqa4_rot_half_f32
[ -f "$fx/reference.json" ] || fx=$(dirname "$(ls "$root"/*/reference.json 2>/dev/null | head -n 1)")
if [ ! -f "$fx/reference.json" ]; then
  echo "no fixture under $root" >&2
  echo "0 passed, 1 failed"
  exit 1
fi
ref=$(tr -d ' \n' < "$fx/reference.json")
field() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" <<< "$ref"; }
ids=$(sed -n 's/.*"ids":\[\([0-9,]*\)\].*/\1/p' <<< "$ref")
n=$(tr ',' '\n' <<< "$ids" | wc -l)
vocab=$(field vocab)
heads=$(field index_heads)
topk=$(field topk)
n_sparse=$(sed -n 's/.*"sparse_layers":\[\([0-9,]*\)\].*/\1/p' <<< "$ref" | tr ',' '\n' | grep -c .)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$m3" logits --model "$fx" --ids "$ids" --out "$tmp/all.f32" --blocks-out "$tmp/all.i32" \
  && ok || bad "prefill run failed"
"$m3" logits --model "$fx" --ids "$ids" --chunk 1 --out "$tmp/one.f32" --blocks-out "$tmp/one.i32" \
  && ok || bad "--chunk 1 run failed"
cmp "$tmp/all.f32" "$tmp/one.f32" && ok || bad "--chunk 1 logits differ from one prefill"
cmp "$tmp/all.i32" "$tmp/one.i32" && ok || bad "--chunk 1 block selections differ"
[ "$(stat -c %s "$tmp/all.f32")" -eq $((n * vocab * 4)) ] && ok || bad "logits file size"
[ "$(stat -c %s "$tmp/all.i32")" -eq $((n_sparse * n * heads * topk * 4)) ] && ok \
  || bad "blocks file size"
cmp "$tmp/all.i32" "$fx/blocks.i32" && ok || bad "block selections differ from the fixture"

expect_fail() { # expect_fail CODE NEEDLE args...
  local code=$1 needle=$2
  shift 2
  "$m3" logits "$@" 2> "$tmp/err"
  local rc=$?
  if [ $rc -eq "$code" ] && grep -q -- "$needle" "$tmp/err"; then ok; else
    bad "m3 logits $*: exit $rc, stderr: $(cat "$tmp/err")"
  fi
}
expect_fail 2 "$vocab" --model "$fx" --ids "1,$vocab,2" --out "$tmp/x"
expect_fail 2 "-5" --model "$fx" --ids "1,-5" --out "$tmp/x"
expect_fail 2 "abc" --model "$fx" --ids "1,abc" --out "$tmp/x"
expect_fail 2 "--chunk" --model "$fx" --ids 1 --chunk 0 --out "$tmp/x"
expect_fail 1 "cuda" --model "$fx" --ids 1 --device cuda --out "$tmp/x"
expect_fail 2 "config.json" --model "$tmp/nowhere" --ids 1 --out "$tmp/x"
[ ! -e "$tmp/x" ] && ok || bad "a failed run left an output file"

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
