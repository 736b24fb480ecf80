#!/bin/bash
# The default model (src/io/default_model.h): without --model, inspect, run, perplexity and serve
# load models/m3-small (the copy the source tree holds, or an installed one with the same files);
# $M3_MODEL_DIR comes first (one without a config.json is an error naming it; empty is unset);
# --speculative eagle3 without --draft drafts with the folder m3-small-eagle3 next to the default
# model, and only for the default model; --help says so. (The message when no default model
# exists is checked by test_io_default_model.)
m3=$1
src=$2
. "$src/tests/check.sh"
unset M3_MODEL_DIR

# ---- where it is found ----
default=$("$m3" inspect --json | jq -r .model)
expect_eq "default folder name" "$(basename "$default")" m3-small
for f in config.json tokenizer.json; do
  cmp -s "$default/$f" "$src/models/m3-small/$f" && ok || bad "$default/$f differs from models/m3-small"
done
"$m3" tiny "$tmp/tiny" > /dev/null || bad "m3 tiny"
expect_eq "M3_MODEL_DIR" "$(M3_MODEL_DIR=$tmp/tiny "$m3" inspect --json | jq -r .model)" "$tmp/tiny"
mkdir "$tmp/empty"
M3_MODEL_DIR=$tmp/empty expect_input_error "M3_MODEL_DIR=$tmp/empty: no config.json" inspect --json
expect_eq "M3_MODEL_DIR empty" "$(M3_MODEL_DIR= "$m3" inspect --json | jq -r .model)" "$default"
# run and perplexity load the same folder as --model would.
want=$("$m3" run --model "$tmp/tiny" --ids 1,2,3 --max-tokens 5 2> /dev/null)
expect_eq "run with M3_MODEL_DIR" "$(M3_MODEL_DIR=$tmp/tiny "$m3" run --ids 1,2,3 --max-tokens 5 2> /dev/null)" "$want"
want=$("$m3" perplexity --model "$tmp/tiny" --text "The quick brown fox" --json)
expect_eq "perplexity with M3_MODEL_DIR" "$(M3_MODEL_DIR=$tmp/tiny "$m3" perplexity --text "The quick brown fox" --json)" "$want"

# ---- serve names the default model by its folder ----
"$m3" serve --port 0 > "$tmp/serve.out" 2> "$tmp/serve.err" &
pid=$!
wait_listening "$tmp/serve.out" "$pid"
kill -TERM "$pid" 2> /dev/null
wait "$pid"
expect_eq "serve exit" "$?" 0
grep -q "^m3 serve: model m3-small, " "$tmp/serve.out" && ok || bad "serve: $(cat "$tmp/serve.out" "$tmp/serve.err")"

# ---- the EAGLE3 draft next to the default model ----
"$m3" tiny "$tmp/sib/m3-small" --no-vision > /dev/null || bad "m3 tiny --no-vision"
"$m3" tiny-draft "$tmp/sib/m3-small-eagle3" --model "$tmp/sib/m3-small" || bad "m3 tiny-draft"
want=$("$m3" run --model "$tmp/sib/m3-small" --draft "$tmp/sib/m3-small-eagle3" --speculative eagle3 \
       --ids 1,2,3 --max-tokens 6 2> "$tmp/err")
[ -n "$want" ] && ok || bad "eagle3 with --draft: $(cat "$tmp/err")"
got=$(M3_MODEL_DIR=$tmp/sib/m3-small/ "$m3" run --speculative eagle3 --ids 1,2,3 --max-tokens 6 2> "$tmp/err")
expect_eq "eagle3 with the sibling draft" "$got" "$want"
# A default model with no draft beside it: the folder looked for is named.
M3_MODEL_DIR=$tmp/tiny expect_input_error "$tmp/m3-small-eagle3" run --speculative eagle3 --ids 1 --max-tokens 1
# --model, even the same folder, keeps asking for --draft.
expect_input_error "--draft" run --model "$tmp/sib/m3-small" --speculative eagle3 --ids 1 --max-tokens 1
# The committed default model and its draft.
"$m3" run --speculative eagle3 --ids 1,2,3 --max-tokens 4 > /dev/null 2> "$tmp/err" && ok \
  || bad "eagle3 on the default model: $(cat "$tmp/err")"

for cmd in run chat serve inspect perplexity; do
  "$m3" $cmd --help | grep -q 'M3_MODEL_DIR' && ok || bad "m3 $cmd --help does not name M3_MODEL_DIR"
done

check_summary
