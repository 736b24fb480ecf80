#!/usr/bin/env bash
# --tp / --ep / --nnodes / --node-rank / --master-addr (issue 11): `m3 inspect --tp N` prints the
# layout plan; run prints it and then runs the ranks in one process (here CPU backends summing on
# the host: the same text as one rank, also with an image); --speculative with several ranks,
# and --nnodes layouts that cannot run here (the CPU ranks, a node count that does not divide the
# ranks) are refused with one line, on node 0 and on a following node alike; bad values exit 2
# naming the flag. (Two nodes running together need GPUs: scripts/gpu-multi.sh.)
#   $1: the m3 binary  $2: the source tree
set -uo pipefail
m3=$1
src=$2
. "$(dirname "$0")/check.sh"
full=$src/tests/data/m3_full

# ---- inspect: the report, then the plan ----
out=$("$m3" inspect --model "$full" --tp 2)
expect_eq "inspect --tp 2 exit" "$?" 0
[[ $out == *"parameters "* ]] && ok || bad "inspect --tp 2: no report before the plan"
[[ $out == *"parallel layout: tp 2 x ep 1 = 2 GPUs"* ]] && ok || bad "inspect --tp 2: no plan: $out"
# 64 heads over 2 ranks: rank 1 has query heads 32-63 and with them KV heads 2-3 (GQA groups of 16).
[[ $out == *"rank 1 (tp 1, ep 0): q heads 32-63, KV heads 2-3"* ]] && ok || bad "inspect --tp 2: rank 1 line"
expect_eq "inspect --tp 2 rank lines" "$(grep -c '^  rank ' <<<"$out")" 2
out=$("$m3" inspect --model "$full" --ep 8)
[[ $out == *"rank 7 (tp 0, ep 7): q heads 0-63, KV heads 0-3"*"experts 112-127"* ]] && ok || bad "inspect --ep 8: rank 7 line"
out=$("$m3" inspect --tp 2)
expect_eq "inspect --tp 2 (default model) exit" "$?" 0
[[ $out == *"tp 2 x ep 1 = 2 GPUs"* ]] && ok || bad "inspect --tp 2 on the default model: $out"

# ---- run: the plan on stdout, then the same text as one rank ----
prompt="The quick brown fox"
one=$("$m3" run --prompt "$prompt" --max-tokens 12 --threads 2 2>/dev/null)
expect_eq "run (one rank) exit" "$?" 0
[[ -n $one ]] && ok || bad "run (one rank): no text"
for layout in "--tp 2" "--tp 2 --ep 2"; do
  # shellcheck disable=SC2086
  out=$("$m3" run $layout --prompt "$prompt" --max-tokens 12 --threads 2 2>"$tmp/err")
  expect_eq "run $layout exit" "$?" 0
  plan=$(grep -c '^parallel layout: ' <<<"$out")
  expect_eq "run $layout: one plan" "$plan" 1
  # The plan's lines, then the generated text exactly as one rank prints it.
  text=$(grep -v -e '^parallel layout: ' -e '^  ' <<<"$out")
  expect_eq "run $layout: text" "$text" "$one"
  [[ $out == *"rank 1 (tp 1, ep 0)"* ]] && ok || bad "run $layout: no rank 1 in the plan: $out"
done
# An image: the vision tower runs on rank 0, every rank splices its rows.
"$m3" tiny "$tmp/vl" >/dev/null || bad "m3 tiny"
image=$src/tests/fixtures/vision/media/tiny_23x9.png
one=$("$m3" run --model "$tmp/vl" --image "$image" --prompt describe --max-tokens 8 2>/dev/null)
[[ -n $one ]] && ok || bad "run --image (one rank): no text"
for layout in "--tp 2" "--tp 2 --ep 2"; do
  # shellcheck disable=SC2086
  out=$("$m3" run --model "$tmp/vl" $layout --image "$image" --prompt describe --max-tokens 8 2>/dev/null)
  expect_eq "run --image $layout: text" "$(grep -v -e '^parallel layout: ' -e '^  ' <<<"$out")" "$one"
done
expect_input_error "--speculative mtp with --tp 2 --ep 1: speculative decoding does not run over several ranks yet" run --tp 2 --speculative mtp
cpu_nodes="--nnodes 2 needs --device cuda: the CPU ranks (--device cpu) sum on the host of one process"
for cmd in run chat serve; do
  for node in 0 1; do
    expect_input_error "m3 $cmd: $cpu_nodes" "$cmd" --model "$full" --tp 2 --nnodes 2 --node-rank $node --master-addr 127.0.0.1:29511
  done
done
expect_input_error "--nnodes 3 does not divide the 2 ranks of --tp 2 x --ep 1" run --model "$full" --tp 2 --nnodes 3 --node-rank 2 --master-addr 127.0.0.1:29511 --device cuda
expect_input_error "--nnodes 2 does not divide the 1 ranks of --tp 1 x --ep 1" serve --model "$full" --nnodes 2 --master-addr 127.0.0.1:29511
expect_input_error "--nnodes 3 does not divide the 4 ranks of --tp 2 x --ep 2" chat --model "$full" --tp 2 --ep 2 --nnodes 3 --node-rank 1 --master-addr h
# One GPU, one node: the flags change nothing (the run goes ahead).
"$m3" run --tp 1 --ep 1 --nnodes 1 --max-tokens 1 --ids 1 >/dev/null 2>&1
expect_eq "run --tp 1 --ep 1 exit" "$?" 0

# ---- bad values ----
expect_input_error "--tp '0': expected an integer in 1..64" run --tp 0
expect_input_error "--tp 'x'" run --tp x
expect_input_error "--ep '65'" run --ep 65
expect_input_error "--tp 3: num_attention_heads 64 is not divisible by 3" run --model "$full" --tp 3
expect_input_error "--ep 3: num_local_experts 128 is not divisible by 3" inspect --model "$full" --ep 3
expect_input_error "--tp 16 x --ep 8: 128 ranks" inspect --model "$full" --tp 16 --ep 8
expect_input_error "--tp '0'" inspect --tp 0
expect_input_error "--tp/--ep: not with --json" inspect --json --tp 2
expect_input_error "--nnodes 2: needs --master-addr" run --nnodes 2 --node-rank 1
expect_input_error "--node-rank 2: expected 0..1 (--nnodes 2)" run --nnodes 2 --node-rank 2 --master-addr h
expect_input_error "--master-addr 'h:99999'" run --master-addr h:99999
expect_input_error "--nnodes '0'" serve --nnodes 0

check_summary
