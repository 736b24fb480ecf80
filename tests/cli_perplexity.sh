#!/bin/bash
# m3 perplexity against a computation of its own here: the text's ids from `m3 tokenize`, cut
# into chunks of --ctx, each chunk's float32 logits from `m3 logits` (a fresh sequence per call),
# -log_softmax of the next token summed in awk. Several chunks with a shorter last one, a last
# chunk of one token (dropped), one chunk holding the whole text; --file equals --text; the text
# line carries the same figures; the default model needs no --model; --kv-dtype fp8 reaches the
# cache (the same check against `m3 logits --kv-dtype fp8`, and a mean nll of its own). Empty text, a missing or
# empty file, --ctx below 2, a text of one token and a model without tokenizer.json exit 2 with
# one line naming the culprit.
m3=$1
src=$2
. "$src/tests/check.sh"

model=$tmp/tiny
"$m3" tiny "$model" > /dev/null || bad "m3 tiny"
# An added token (<mm:think>, matched as one id as `m3 tokenize` does) and non-ASCII bytes.
text='The quick brown fox jumps over the lazy dog. <mm:think> Pack my box with five dozen liquor jugs: wörld!'
ids=($("$m3" tokenize --model "$model" --text "$text"))
n=${#ids[@]}
[ "$n" -ge 20 ] && ok || bad "the test text is only $n tokens"

kv=() # options both m3 perplexity and m3 logits get (the KV cache's dtype)

# sum of -log_softmax(row j)[ids[j+1]] over rows j < len-1 of the logits of ids[start, start+len)
chunk_nll() { # start len
  local list
  list=$(IFS=,; echo "${ids[*]:$1:$2}")
  "$m3" logits --model "$model" --ids "$list" --out "$tmp/chunk.f32" "${kv[@]}" || { bad "m3 logits $list"; return; }
  local vocab=$(($(stat -c %s "$tmp/chunk.f32") / 4 / $2))
  od -A n -v -t f4 "$tmp/chunk.f32" | tr -s ' ' '\n' | grep . | awk -v V="$vocab" -v ids="$list" '
    BEGIN { n = split(ids, t, ",") }
    {
      c = (NR - 1) % V
      x[c] = $1 + 0
      if (c < V - 1) next
      r = (NR - V) / V
      if (r >= n - 1) next
      m = x[0]
      for (i = 1; i < V; i++) if (x[i] > m) m = x[i]
      s = 0
      for (i = 0; i < V; i++) s += exp(x[i] - m)
      sum += m + log(s) - x[t[r + 2] + 0]
    }
    END { printf "%.17g\n", sum }'
}

# "tokens chunks mean_nll" for --ctx $1, from the chunks' logits
expected() {
  local ctx=$1 start tokens=0 chunks=0 total=0 len
  for ((start = 0; start < n; start += ctx)); do
    len=$((n - start < ctx ? n - start : ctx))
    [ "$len" -lt 2 ] && continue
    total=$(awk -v a="$total" -v b="$(chunk_nll "$start" "$len")" 'BEGIN { printf "%.17g", a + b }')
    tokens=$((tokens + len - 1))
    chunks=$((chunks + 1))
  done
  echo "$tokens $chunks $(awk -v s="$total" -v t="$tokens" 'BEGIN { printf "%.17g", s / t }')"
}

# compares `m3 perplexity --ctx $1 --json` with expected
check_ctx() {
  local ctx=$1 js want got
  js=$("$m3" perplexity --model "$model" --text "$text" --ctx "$ctx" --json "${kv[@]}") || { bad "--ctx $ctx: exit $?"; return; }
  want=$(expected "$ctx")
  got=$(jq -r '"\(.tokens) \(.chunks)"' <<< "$js")
  expect_eq "--ctx $ctx tokens and chunks" "$got" "${want% *}"
  awk -v a="$(jq .mean_nll <<< "$js")" -v b="${want##* }" -v p="$(jq .perplexity <<< "$js")" 'BEGIN {
    d = a - b; if (d < 0) d = -d
    e = p - exp(a); if (e < 0) e = -e
    exit !(b > 0 && d <= 1e-9 * b && e <= 1e-12 * p) }' \
    && ok || bad "--ctx $ctx ${kv[*]}: $js, expected mean nll ${want##* }"
}

check_ctx 7                # several chunks, the last shorter
check_ctx $((n - 1))       # a last chunk of one token: dropped
check_ctx 512              # the default: one chunk, the whole text
expect_eq "--ctx $((n - 1)) chunks" "$("$m3" perplexity --model "$model" --text "$text" --ctx $((n - 1)) --json | jq .chunks)" 1
kv=(--kv-dtype fp8)
check_ctx 7
kv=()
f32=$("$m3" perplexity --model "$model" --text "$text" --ctx 7 --json | jq .mean_nll)
fp8=$("$m3" perplexity --model "$model" --text "$text" --ctx 7 --json --kv-dtype fp8 | jq .mean_nll)
[ "$f32" != "$fp8" ] && ok || bad "--kv-dtype fp8 gives the float32 cache's mean nll $f32"

# --file reads the same text; the text line shows the same figures.
printf '%s' "$text" > "$tmp/text.txt"
js=$("$m3" perplexity --model "$model" --text "$text" --ctx 9 --json)
expect_eq "--file equals --text" "$("$m3" perplexity --model "$model" --file "$tmp/text.txt" --ctx 9 --json)" "$js"
line=$("$m3" perplexity --model "$model" --file "$tmp/text.txt" --ctx 9)
want=$(jq -r '"perplexity \(.perplexity) (mean nll \(.mean_nll) nats over \(.tokens) tokens in \(.chunks) chunks of <= 9)"' <<< "$js" \
  | awk '{ $2 = sprintf("%.4f", $2); $5 = sprintf("%.5f", $5); print }')
expect_eq "text line" "$line" "$want"

# Without --model: the default model.
default=$("$m3" inspect --json | jq -r .model)
dn=$("$m3" tokenize --model "$default" --text "$text" | wc -w)
expect_eq "default model tokens" "$("$m3" perplexity --text "$text" --json | jq .tokens)" $((dn - 1))

# Bad input.
expect_input_error "--text" perplexity --model "$model" --text ""
expect_input_error "$tmp/missing.txt" perplexity --model "$model" --file "$tmp/missing.txt"
: > "$tmp/empty.txt"
expect_input_error "$tmp/empty.txt" perplexity --model "$model" --file "$tmp/empty.txt"
expect_input_error "--ctx '1'" perplexity --model "$model" --text "$text" --ctx 1
expect_input_error "--ctx 'x'" perplexity --model "$model" --text "$text" --ctx x
expect_input_error "at least 2" perplexity --model "$model" --text "a"
expect_input_error "one of --file" perplexity --model "$model" --text "$text" --file "$tmp/text.txt"
expect_input_error "one of --file" perplexity --model "$model"
expect_input_error "--bogus" perplexity --model "$model" --text "$text" --bogus 1
expect_input_error "--kv-dtype 'e5m2'" perplexity --model "$model" --text "$text" --kv-dtype e5m2
fx=$(dirname "$(ls "$src"/tests/fixtures/text/*/reference.json | head -n 1)")
expect_input_error "tokenizer.json" perplexity --model "$fx" --text "$text"

check_summary
