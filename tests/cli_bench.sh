#!/usr/bin/env bash
# m3 bench: the dispatcher (every part reachable, bad parts and options rejected) and
# `m3 bench model` on a tiny checkpoint: its weight accounting against m3 inspect's independent
# parameter arithmetic (all text weights; one decode token = active layers + one embedding row +
# lm_head), and a table with both decode and both prefill rows; --batch (tokens per row, the
# expected distinct experts of the floor, ms/step and x floor consistent with the other
# columns); --device cuda failing cleanly without a GPU; m3 tiny's --vocab, --no-mtp and
# --no-vision giving a model the engine loads. Figures are not checked: this is not a timed
# test. Needs jq.
#   $1: the m3 binary  $2: the source tree
set -uo pipefail
m3=$1
. "$(dirname "$0")/check.sh"

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
# Rows: phase, positions, tokens, then figures. Each decode phase follows 2 untimed steps.
expect_eq "decode at the short context" "$(awk '$1 == "decode" && $2 == "18..22" {print $3}' <<<"$out")" 4
expect_eq "prefill from empty" "$(awk '$1 == "prefill" && $2 == "0..24" {print $3}' <<<"$out")" 24
expect_eq "prefill on to --ctx" "$(awk '$1 == "prefill" && $2 == "24..40" {print $3}' <<<"$out")" 16
expect_eq "decode at --ctx" "$(awk '$1 == "decode" && $2 == "42..46" {print $3}' <<<"$out")" 4
positive=$(awk '($1 == "decode" || $1 == "prefill") && $5 > 0 {n++} END {print n + 0}' <<<"$out")
expect_eq "rows with tokens/s > 0" "$positive" 4
if [[ "$out" == *"copy bandwidth, 1 thread: "*" GB/s (read + written, 2 x 8 MiB)"* ]]; then ok; else bad "no copy bandwidth: $out"; fi
# At batch 1 the step floor reads what one decode token reads.
mb1=$(sed -n 's/.*read per decode token: \([0-9.]*\) MB.*/\1/p' <<<"$out")
expect_eq "batch-1 floor bytes" "$(sed -n 's/^step floor, batch 1: \([0-9.]*\) MB.*/\1/p' <<<"$out")" "$mb1"

# ---- --profile: each phase's ops, counted per (op, weight) ----
# FD,SM,FM,SD: two dense-attention and two MSA layers; the 24-token prefill is one forward.
out=$("$m3" bench model --model "$tmp/tiny" --threads 1 --ctx 24 --prefill 24 --decode 3 --copy-mib 8 --profile)
expect_eq "m3 bench model --profile exits" "$?" 0
# calls summed over the rows of the table titled "profile of $1" whose op is $2 and whose next
# word matches $3 (rows: ms share calls us/call host-us op [weight or kind]; a matmul_set's row
# names its first weight first, the set of a sparse layer differing from a full layer's)
calls() { awk -v title="profile of $1" -v op="$2" -v re="$3" '
  index($0, title) == 1 {on = 1; next}
  /^[^ ]/ {on = 0}
  on && $6 == op && $7 ~ re {n += $3; found = 1}
  END {if (found) print n}' <<<"$out"; }
expect_eq "prefill: one embedding" "$(calls "the prefill:" embed '^$')" 1
expect_eq "prefill: q_proj once per layer" "$(calls "the prefill:" matmul_set 'self_attn\.q_proj')" 4
expect_eq "prefill: MSA attention in the 2 sparse layers" "$(calls "the prefill:" attention '^\(MSA')" 2
expect_eq "prefill: dense attention in the 2 full layers" "$(calls "the prefill:" attention '^\(dense')" 2
expect_eq "decode at --ctx: 3 steps x 4 layers of q_proj" "$(calls "the decode at --ctx:" matmul_set 'self_attn\.q_proj')" 12
# A sparse layer's projections of h in one matmul_set, its row naming each weight.
set_row="matmul_set language_model.model.layers.#.self_attn.q_proj.weight + k_proj.weight + v_proj.weight + index_q_proj.weight + index_k_proj.weight"
if [[ "$out" == *"$set_row"* ]]; then ok; else bad "no profile row '$set_row': $out"; fi

# ---- --batch: 4 sequences per step, each with its own cache ----
out=$("$m3" bench model --model "$tmp/tiny" --threads 1 --ctx 40 --prefill 24 --decode 3 --batch 4 --copy-mib 8)
expect_eq "m3 bench model --batch 4 exits" "$?" 0
expect_eq "batch decode at the short context: 4 x 3 tokens" "$(awk '$1 == "decode" && $2 == "18..21" {print $3}' <<<"$out")" 12
expect_eq "batch decode at --ctx: 4 x 3 tokens" "$(awk '$1 == "decode" && $2 == "42..45" {print $3}' <<<"$out")" 12
# Uniform routing over 8 experts, top 2, 4 tokens: 8 (1 - (6/8)^4) distinct experts expected.
want=$(awk 'BEGIN {printf "%.2f", 8 * (1 - (6 / 8) ^ 4)}')
if [[ "$out" == *"step floor, batch 4: "*"(routed experts: $want distinct of 8 per MoE layer"* ]]; then ok
else bad "no batch-4 floor with $want experts: $out"; fi
# ms/step and x floor agree with seconds / steps and with the printed floor.
floor=$(sed -n 's/^step floor, batch 4: .* = \([0-9.]*\) ms.*/\1/p' <<<"$out")
while read -r tps ms times; do
  expect_eq "ms/step = 12 tokens / tokens/s / 3 steps" "$(awk -v t="$tps" -v m="$ms" 'BEGIN {r = 12 / t * 1000 / 3; print (m > 0 && (m - r) / r < 0.05 && (r - m) / r < 0.05)}')" 1
  expect_eq "x floor = ms/step / floor" "$(awk -v m="$ms" -v f="$floor" -v x="$times" 'BEGIN {r = m / f; print (f > 0 && x > 0 && (x - r) / r < 0.05 && (r - x) / r < 0.05)}')" 1
done < <(awk '$1 == "decode" {print $5, $10, $11}' <<<"$out")
expect_input_error "--batch '0'" bench model --model "$tmp/tiny" --batch 0
expect_input_error "--batch '257'" bench model --model "$tmp/tiny" --batch 257
# --device cuda: a CPU-only build (or a machine without a GPU) fails with one line, exit 1.
err=$("$m3" bench model --model "$tmp/tiny" --device cuda --decode 1 --prefill 1 --ctx 1 --copy-mib 8 2>&1 >/dev/null)
rc=$?
if [ "$rc" -eq 0 ] || { [ "$rc" -eq 1 ] && [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] && [[ "$err" == *"cuda"* ]]; }; then ok
else bad "m3 bench model --device cuda: exit $rc, '$err'"; fi
expect_input_error "device 'gpu'" bench model --model "$tmp/tiny" --device gpu

# ---- m3 tiny --vocab --no-mtp --no-vision: a text-only model the whole engine loads ----
"$m3" tiny "$tmp/text" --vocab 700 --no-mtp --no-vision --layers FD,SM >/dev/null || bad "m3 tiny --no-vision failed"
out=$("$m3" bench model --model "$tmp/text" --threads 1 --ctx 8 --prefill 8 --decode 2 --copy-mib 8)
expect_eq "m3 bench model on the text-only model exits" "$?" 0
if [[ "$out" == *"experts top 2 x 32, shared 40, dense 96, vocab 700"* ]]; then ok; else bad "vocab 700 not in: $out"; fi
expect_eq "text-only config" "$(jq -r '.model_type + " " + (.architectures[0])' "$tmp/text/config.json")" \
  "minimax_m3_vl_text MiniMaxM3SparseForCausalLM"
expect_input_error "--vocab 5 is below the tokenizer's" tiny "$tmp/v5" --vocab 5
expect_input_error "--vocab '262145'" tiny "$tmp/v5" --vocab 262145

check_summary
