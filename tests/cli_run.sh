#!/bin/bash
# m3 run: greedy generation continues exactly as `m3 logits` predicts (the argmax of the last
# row, token after token), sampling is reproducible per seed, --prompt goes through the model's
# tokenizer (a tiny model from `m3 tiny` has one; a fixture folder has none, which fails clearly)
# and streams the greedy continuation as text; the sampling filters are accepted and checked;
# without --model the default model runs.
m3=$1
src=$2
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { echo "FAIL: $*" >&2; fail=$((fail + 1)); }

fx=$src/tests/fixtures/text/mixed_gqa4_rot_half_f32
root=$src/tests/fixtures/text
[ -f "$fx/reference.json" ] || fx=$(dirname "$(ls "$root"/*/reference.json 2>/dev/null | head -n 1)")
if [ ! -f "$fx/reference.json" ]; then
  echo "no fixture under $root" >&2
  echo "0 passed, 1 failed"
  exit 1
fi
vocab=$(tr -d ' \n' < "$fx/reference.json" | sed -n 's/.*"vocab":\([0-9]*\).*/\1/p')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tiny=$tmp/tiny
"$m3" tiny "$tiny" > /dev/null || bad "m3 tiny"

# argmax of the last row of a logits file (of vocabulary $2, default $vocab)
last_argmax() {
  local v=${2:-$vocab}
  local rows=$(($(stat -c %s "$1") / 4 / v))
  od -A n -v -t f4 -j $(((rows - 1) * v * 4)) "$1" | tr -s ' ' '\n' | grep . \
    | awk 'NR == 1 || $1 > best { best = $1; arg = NR - 1 } END { print arg }'
}

prompt=5,17,42,99,3,250,8,61,77
gen=$("$m3" run --model "$fx" --ids $prompt --max-tokens 4 2> "$tmp/speed")
[ $? -eq 0 ] && ok || bad "m3 run failed: $(cat "$tmp/speed")"
[ "$(tr ',' '\n' <<< "$gen" | grep -c .)" -eq 4 ] && ok || bad "expected 4 ids, got '$gen'"
grep -q "tokens/s" "$tmp/speed" && ok || bad "no speed line: $(cat "$tmp/speed")"
ctx=$prompt
for tok in $(tr ',' ' ' <<< "$gen"); do
  "$m3" logits --model "$fx" --ids "$ctx" --out "$tmp/l.f32" || bad "m3 logits $ctx"
  want=$(last_argmax "$tmp/l.f32")
  [ "$want" = "$tok" ] && ok || bad "after $ctx: run gave $tok, logits argmax $want"
  ctx=$ctx,$tok
done

a=$("$m3" run --model "$fx" --ids $prompt --max-tokens 6 --temperature 1 --seed 7 2> /dev/null)
b=$("$m3" run --model "$fx" --ids $prompt --max-tokens 6 --temperature 1 --seed 7 2> /dev/null)
[ -n "$a" ] && [ "$a" = "$b" ] && ok || bad "same seed, different samples: '$a' vs '$b'"

"$m3" run --model "$fx" --prompt hello 2> "$tmp/err"
rc=$?
[ $rc -eq 2 ] && grep -q "tokenizer.json" "$tmp/err" && ok || bad "--prompt: exit $rc, $(cat "$tmp/err")"
"$m3" run --model "$tiny" --prompt "The quick brown fox" --max-tokens 5 > "$tmp/text" 2> "$tmp/err" && ok \
  || bad "--prompt on the tiny model: $(cat "$tmp/err")"
grep -q "tokens/s" "$tmp/err" && ok || bad "--prompt: no speed line"
# The streamed text of --prompt is the greedy continuation `m3 logits` predicts, decoded: the
# prompt's ids from `m3 tokenize`, then the argmax token after token until the end-of-turn id.
cfg=$(tr -d ' \t\n' < "$tiny/config.json")
bvocab=$(sed -n 's/.*"vocab_size":\([0-9]*\).*/\1/p' <<< "$cfg")
beos=$(sed -n 's/.*"eos_token_id":\([0-9]*\).*/\1/p' <<< "$cfg")
ctx=$("$m3" tokenize --model "$tiny" --text "The quick brown fox" | tr ' ' ',')
greedy=
for i in 1 2 3 4 5; do
  "$m3" logits --model "$tiny" --ids "$ctx" --out "$tmp/b.f32" || bad "m3 logits on the tiny model"
  next=$(last_argmax "$tmp/b.f32" "$bvocab")
  [ "$next" = "$beos" ] && break
  greedy=${greedy:+$greedy,}$next
  ctx=$ctx,$next
done
if [ -n "$greedy" ]; then
  "$m3" detokenize --model "$tiny" --ids "$greedy" --skip-special > "$tmp/want"
else
  : > "$tmp/want"
fi
echo >> "$tmp/want" # run ends its output with a newline
cmp -s "$tmp/text" "$tmp/want" && ok || bad "--prompt streamed '$(cat "$tmp/text")', logits predict ids $greedy"

# Sampling filters: each accepted; and at temperature 1, top-k 1, a tiny top-p and min-p 1 each
# keep only the most likely token, so they reproduce the greedy output.
for f in "--top-k 1" "--top-p 0.000001" "--min-p 1"; do
  out=$("$m3" run --model "$fx" --ids $prompt --max-tokens 4 --temperature 1 --seed 3 $f 2> "$tmp/err")
  [ $? -eq 0 ] && [ "$out" = "$gen" ] && ok || bad "$f: '$out' (greedy '$gen') $(cat "$tmp/err")"
done
a=$("$m3" run --model "$fx" --ids $prompt --max-tokens 6 --temperature 0.8 --top-k 5 --top-p 0.9 --min-p 0.05 --seed 11 2> /dev/null)
b=$("$m3" run --model "$fx" --ids $prompt --max-tokens 6 --temperature 0.8 --top-k 5 --top-p 0.9 --min-p 0.05 --seed 11 2> /dev/null)
[ "$(tr ',' '\n' <<< "$a" | grep -c .)" -eq 6 ] && [ "$a" = "$b" ] && ok || bad "filters with a seed: '$a' vs '$b'"
for bad_flag in "--top-k -1" "--top-k x" "--top-p 0" "--top-p 1.5" "--min-p 2" "--min-p -0.1" \
                "--temperature x" "--max-tokens -3" "--seed y"; do
  "$m3" run --model "$fx" --ids $prompt $bad_flag > /dev/null 2> "$tmp/err"
  rc=$?
  flag=${bad_flag%% *}
  [ $rc -eq 2 ] && grep -q -- "$flag" "$tmp/err" && ok || bad "$bad_flag: exit $rc, $(cat "$tmp/err")"
done

"$m3" run --prompt "" 2> "$tmp/err"
rc=$?
[ $rc -eq 2 ] && grep -q "no tokens" "$tmp/err" && ok || bad "empty --prompt: exit $rc, $(cat "$tmp/err")"
"$m3" run --model "$fx" --ids "1,$vocab" 2> "$tmp/err"
rc=$?
[ $rc -eq 2 ] && grep -q "$vocab" "$tmp/err" && ok || bad "bad id: exit $rc, $(cat "$tmp/err")"
"$m3" run --ids 1,2,3 --max-tokens 2 > "$tmp/default" 2> "$tmp/err" && ok \
  || bad "default model: $(cat "$tmp/err")"

# The README's first command: `m3 run` alone continues the default prompt on the default model,
# which is "m3 run --prompt 'The quick brown fox'" exactly.
"$m3" run --max-tokens 4 > "$tmp/plain" 2> "$tmp/err" || bad "m3 run alone: $(cat "$tmp/err")"
"$m3" run --max-tokens 4 --prompt "The quick brown fox" > "$tmp/explicit" 2> /dev/null
[ -s "$tmp/plain" ] && cmp -s "$tmp/plain" "$tmp/explicit" && ok || bad "m3 run alone differs from the default prompt"
"$m3" run --ids 1,2 --prompt x 2> "$tmp/err"
rc=$?
[ $rc -eq 2 ] && grep -q "not both" "$tmp/err" && ok || bad "--ids with --prompt: exit $rc, $(cat "$tmp/err")"

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
