#!/bin/bash
# m3 bench accept on the default model and its drafts: it exits 0 only when every speculative
# greedy output equals the plain greedy one (MTP and EAGLE3, k = 1 and 2), prints a row per
# drafter and k with an acceptance length in [1, k + 1]; bad options exit 2 naming them.
m3=$1
src=$2
. "$src/tests/check.sh"
unset M3_MODEL_DIR
text=$src/tests/fixtures/m3-small/heldout.txt

out=$("$m3" bench accept --file "$text" --draft "$src/models/m3-small-eagle3" --prompts 2 \
      --prompt-tokens 32 --gen-tokens 16 --max-draft 2 --threads 2) \
  && ok || bad "bench accept exited $?"
for kind in mtp eagle3; do
  for k in 1 2; do
    row=$(printf '%s\n' "$out" | awk -v d="$kind" -v k="$k" '$1 == d && $2 == k')
    [ -n "$row" ] || { bad "no row for $kind k=$k"; continue; }
    expect_eq "$kind k=$k identical" "$(printf '%s\n' "$row" | awk '{print $NF}')" yes
    len=$(printf '%s\n' "$row" | awk '{print $6}')
    awk -v l="$len" -v k="$k" 'BEGIN { exit !(l >= 1 && l <= k + 1) }' && ok \
      || bad "$kind k=$k acceptance length $len outside 1..$((k + 1))"
  done
done

expect_input_error "--file F is required" bench accept --prompts 2
expect_input_error "unknown option '--bogus'" bench accept --file "$text" --bogus 1
expect_input_error "--max-draft '0'" bench accept --file "$text" --max-draft 0
expect_input_error "$tmp/none" bench accept --file "$tmp/none"
printf 'short' > "$tmp/short.txt"
expect_input_error "fewer than --prompt-tokens" bench accept --file "$tmp/short.txt"
check_summary
