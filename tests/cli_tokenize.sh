#!/usr/bin/env bash
# m3 tokenize / detokenize / bench tok on the tiny M3 tokenizer fixture. Expected ids are HF
# tokenizers' (tests/fixtures/tok/tiny.ids.gz, line N for corpus.jsonl line N). Needs jq, gzip.
#   $1: the m3 binary  $2: the source tree
set -uo pipefail
m3=$1
fx=$2/tests/fixtures/tok
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*" >&2; }
expect_eq() { # name actual expected
  if [ "$2" = "$3" ]; then ok; else bad "$1: got '$2', expected '$3'"; fi
}
# Runs m3 with the remaining args; it must exit $1 with one stderr line containing $2.
expect_exit() {
  local want=$1 needle=$2
  shift 2
  local err rc
  err=$("$m3" "$@" 2>&1 >/dev/null)
  rc=$?
  if [ "$rc" -eq "$want" ] && [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] && [[ "$err" == *"$needle"* ]]; then
    ok
  else
    bad "m3 $*: exit $rc, stderr '$err' (expected exit $want and one line naming '$needle')"
  fi
}
expect_input_error() { expect_exit 2 "$@"; }

cp "$fx/tiny.json" "$tmp/tokenizer.json"
for line in 8 11 16 19; do
  text=$(sed -n "${line}p" "$fx/corpus.jsonl" | jq -j .)
  want=$(gzip -dc "$fx/tiny.ids.gz" | sed -n "${line}p")
  got=$("$m3" tokenize --tokenizer "$fx/tiny.json" --text "$text")
  expect_eq "tokenize corpus line $line" "$got" "$want"
  got=$("$m3" tokenize --model "$tmp" --text "$text" --json)
  expect_eq "tokenize --json line $line" "$got" "[${want// /,}]"
  printf '%s' "$text" >"$tmp/text"
  got=$("$m3" tokenize --model "$tmp" --file "$tmp/text")
  expect_eq "tokenize --file line $line" "$got" "$want"
  "$m3" detokenize --model "$tmp" --ids "${want// /,}" >"$tmp/back"
  if cmp -s "$tmp/text" "$tmp/back"; then ok; else bad "detokenize line $line: text differs"; fi
done

# ]~!b[ ]~b] are special and dropped by --skip-special; ids from the HF line of "]~b]ai\nhi[e~[".
ids=$(gzip -dc "$fx/tiny.ids.gz" | sed -n 16p)
got=$("$m3" detokenize --tokenizer "$fx/tiny.json" --ids "${ids// /,}" --skip-special)
expect_eq "detokenize --skip-special" "$got" "$(printf 'ai\nhi')"

out=$("$m3" bench tok --tokenizer "$fx/tiny.json" --file "$tmp/text" --repeat 2)
if [[ "$out" == *"MB/s"*"tokens/s"* ]]; then ok; else bad "bench tok prints no MB/s and tokens/s: $out"; fi

expect_input_error "no_such.json" tokenize --tokenizer "$tmp/no_such.json" --text hi
expect_input_error "tokenizer.json" tokenize --model "$tmp/no_dir" --text hi
expect_input_error "--model DIR or --tokenizer FILE" tokenize --model "$tmp" --tokenizer "$fx/tiny.json" --text hi
expect_input_error "--text S or --file F" tokenize --model "$tmp" --text hi --file "$tmp/text"
expect_input_error "--ids" detokenize --model "$tmp" --ids 1,x
expect_input_error "unknown option" tokenize --model "$tmp" --text hi --frobnicate
printf 'bad \xc3' >"$tmp/bad"
expect_input_error "not valid UTF-8" tokenize --model "$tmp" --file "$tmp/bad"
printf '{"model": {"type": "Unigram"}}' >"$tmp/unigram.json"
# Valid JSON that this build cannot handle: M3_ERR_UNSUPPORTED, exit 1.
expect_exit 1 "model.type 'Unigram'" tokenize --tokenizer "$tmp/unigram.json" --text hi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
