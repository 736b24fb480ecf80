#!/usr/bin/env bash
# m3 tiny + m3 inspect: parameter arithmetic on the full-size config, tiny checkpoints of every
# dtype checked against their own safetensors headers (read here with jq, independently of m3),
# bad input, determinism and the built-in model cache. Needs jq.
#   $1: the m3 binary  $2: the source tree
set -uo pipefail
m3=$1
src=$2
. "$(dirname "$0")/check.sh"

# The safetensors header of $1 as JSON (u64 little-endian length, then the header).
header() {
  local n
  n=$(od -An -tu8 -N8 "$1" | tr -d ' ')
  tail -c +9 "$1" | head -c "$n"
}

# ---- checkpoints written by transformers 5.17 (save_pretrained): every reference fixture with an
# expected_inspect.json (parameter count and tensor count summed in Python, layer kinds) ----
for exp in "$src"/tests/fixtures/text/*/expected_inspect.json; do
  dir=$(dirname "$exp")
  name=$(basename "$dir")
  got=$("$m3" inspect --model "$dir" --json) || { bad "$name: inspect failed"; continue; }
  expect_eq "$name params_total" "$(jq .params_total <<<"$got")" "$(jq .params_total "$exp")"
  expect_eq "$name bound_elements" "$(jq .bound_elements <<<"$got")" "$(jq .params_total "$exp")"
  expect_eq "$name layers" "$(jq -c .layers <<<"$got")" "$(jq -c .layers "$exp")"
  expect_eq "$name tensors in the file" "$(header "$dir/model.safetensors" | jq '[keys[] | select(. != "__metadata__")] | length')" "$(jq .num_tensors "$exp")"
done

# ---- the full-size config (427B): arithmetic only ----
full=$src/tests/data/m3_full
json=$("$m3" inspect --model "$full" --json)
expect_eq "m3_full params_total" "$(jq .params_total <<<"$json")" 427040140160
expect_eq "m3_full params_active" "$(jq .params_active <<<"$json")" 23504087424
# 60 layers x 2 (K, V) x 4 KV heads x 128 x 2 bytes + 57 sparse layers x 128 x 2 bytes.
expect_eq "m3_full kv_bytes_per_token" "$(jq .kv_bytes_per_token <<<"$json")" $((60 * 2 * 4 * 128 * 2 + 57 * 128 * 2))
expect_eq "m3_full ctx" "$(jq .ctx <<<"$json")" 131072
expect_eq "m3_full layers" "$(jq -c '[.layers[] | .attention + "/" + .mlp] | unique' <<<"$json")" '["full/dense","sparse/moe"]'
expect_eq "m3_full weights_present" "$(jq .weights_present <<<"$json")" false
text=$("$m3" inspect --model "$full" --ctx 1000)
[[ "$text" == *"427,040,140,160"* ]] && ok || bad "text form lacks 427,040,140,160"
[[ "$text" == *"23.50B"* ]] && ok || bad "text form lacks 23.50B"
[[ "$text" == *"0-2 full attention + dense MLP; 3-59 sparse (MSA) + MoE"* ]] && ok || bad "layer runs: $text"
expect_eq "m3_full --ctx" "$("$m3" inspect --model "$full" --json --ctx 1000 | jq '.memory_bytes - .weight_bytes')" \
  $((1000 * (60 * 2 * 4 * 128 * 2 + 57 * 128 * 2)))

# ---- tiny checkpoints of each dtype, against their own headers ----
for dt in bf16 f32 mxfp8; do
  dir=$tmp/tiny_$dt
  if ! "$m3" tiny "$dir" --dtype "$dt" >/dev/null; then
    bad "m3 tiny --dtype $dt failed"
    continue
  fi
  json=$("$m3" inspect --model "$dir" --json) || { bad "inspect $dt failed"; continue; }
  hdr=$(header "$dir/model.safetensors")
  elements=$(jq '[to_entries[] | select(.key != "__metadata__" and (.key | endswith("_scale_inv") | not))
                  | .value.shape | reduce .[] as $d (1; . * $d)] | add' <<<"$hdr")
  scales=$(jq '[keys[] | select(endswith("_scale_inv"))] | length' <<<"$hdr")
  data_bytes=$(($(stat -c %s "$dir/model.safetensors") - 8 - $(od -An -tu8 -N8 "$dir/model.safetensors" | tr -d ' ')))
  expect_eq "$dt params_total = header elements" "$(jq .params_total <<<"$json")" "$elements"
  expect_eq "$dt bound_elements" "$(jq .bound_elements <<<"$json")" "$elements"
  expect_eq "$dt weight_bytes = data section" "$(jq .weight_bytes <<<"$json")" "$data_bytes"
  expect_eq "$dt bytes_by_dtype sum" "$(jq '[.bytes_by_dtype[]] | add' <<<"$json")" "$data_bytes"
  expect_eq "$dt quantized_tensors" "$(jq .quantization.quantized_tensors <<<"$json")" "$scales"
  # Default plan FD,FM,SD,SM: 4 layers x (K, V) x 2 KV heads x 16 x 2 bytes + 2 sparse x 24 x 2.
  expect_eq "$dt kv_bytes_per_token" "$(jq .kv_bytes_per_token <<<"$json")" $((4 * 2 * 2 * 16 * 2 + 2 * 24 * 2))
  expect_eq "$dt vocab = tokenizer size" "$(jq .text_config.vocab_size "$dir/config.json")" \
    "$(jq '(.model.vocab | length) + (.added_tokens | length)' "$dir/tokenizer.json")"
done
expect_eq "bf16 quantization" "$(jq -r .quantization.method <<<"$("$m3" inspect --model "$tmp/tiny_bf16" --json)")" none
mx=$("$m3" inspect --model "$tmp/tiny_mxfp8" --json)
expect_eq "mxfp8 method" "$(jq -r .quantization.method <<<"$mx")" mxfp8
[ "$(jq .quantization.by_format.mxfp8 <<<"$mx")" -gt 0 ] && ok || bad "mxfp8: no MXFP8 tensors"
expect_eq "mxfp8 config" "$(jq -c '.quantization_config | {quant_method, weight_block_size, activation_scheme}' "$tmp/tiny_mxfp8/config.json")" \
  '{"quant_method":"mxfp8","weight_block_size":[1,32],"activation_scheme":"dynamic"}'
expect_eq "mxfp8 scale dtype" "$(header "$tmp/tiny_mxfp8/model.safetensors" | jq -r '."language_model.model.layers.0.self_attn.q_proj.weight_scale_inv".dtype')" U8
expect_eq "mxfp8 router stays F32" "$(header "$tmp/tiny_mxfp8/model.safetensors" | jq -r '."language_model.model.layers.1.block_sparse_moe.gate.weight".dtype')" F32

# --quantize mxfp8 on the BF16 checkpoint reports what loading it so holds: the bytes and counts
# of the MXFP8 checkpoint of the same seed (checked against its own header above); a config-only
# folder's estimate likewise.
bq=$("$m3" inspect --model "$tmp/tiny_bf16" --json --quantize mxfp8)
expect_eq "--quantize bytes_by_dtype" "$(jq -c .bytes_by_dtype <<<"$bq")" "$(jq -c .bytes_by_dtype <<<"$mx")"
expect_eq "--quantize weight_bytes" "$(jq .weight_bytes <<<"$bq")" "$(jq .weight_bytes <<<"$mx")"
expect_eq "--quantize quantized_tensors" "$(jq .quantization.quantized_tensors <<<"$bq")" \
  "$(header "$tmp/tiny_mxfp8/model.safetensors" | jq '[keys[] | select(endswith("_scale_inv"))] | length')"
mkdir -p "$tmp/conf_bf16" "$tmp/conf_mxfp8"
cp "$tmp/tiny_bf16/config.json" "$tmp/conf_bf16/"
cp "$tmp/tiny_mxfp8/config.json" "$tmp/conf_mxfp8/"
expect_eq "--quantize config-only estimate" \
  "$("$m3" inspect --model "$tmp/conf_bf16" --json --quantize mxfp8 | jq -c .bytes_by_dtype)" \
  "$("$m3" inspect --model "$tmp/conf_mxfp8" --json | jq -c .bytes_by_dtype)"
expect_input_error "--quantize 'fp4'" inspect --model "$tmp/tiny_bf16" --quantize fp4
expect_input_error "--quantize 'fp4'" logits --model "$tmp/tiny_bf16" --ids 1 --out "$tmp/l.bin" --quantize fp4
expect_input_error "--quantize 'int8'" run --model "$tmp/tiny_bf16" --ids 1 --quantize int8

# A layer plan shows up in config and inspect.
"$m3" tiny "$tmp/plan" --layers SM,SM,FD >/dev/null || bad "m3 tiny --layers SM,SM,FD failed"
expect_eq "plan layers" "$("$m3" inspect --model "$tmp/plan" --json | jq -c '[.layers[] | .attention + "/" + .mlp]')" \
  '["sparse/moe","sparse/moe","full/dense"]'
[[ "$("$m3" inspect --model "$tmp/plan")" == *"0-1 sparse (MSA) + MoE; 2 full attention + dense MLP"* ]] && ok || bad "plan runs"

# ---- determinism ----
"$m3" tiny "$tmp/same" >/dev/null && "$m3" tiny "$tmp/other" --seed 2 >/dev/null
for f in config.json model.safetensors tokenizer.json; do
  cmp -s "$tmp/tiny_bf16/$f" "$tmp/same/$f" && ok || bad "same seed, different $f"
done
cmp -s "$tmp/same/model.safetensors" "$tmp/other/model.safetensors" && bad "seeds 1 and 2 gave the same weights" || ok

# ---- the built-in model: the default tiny checkpoint, cached once (tiny-draft's default target;
# run, chat, serve and inspect default to models/m3-small, tests/cli_default_model.sh) ----
cache=$tmp/cache
M3_CACHE=$cache "$m3" tiny-draft "$tmp/draft1" >/dev/null &
M3_CACHE=$cache "$m3" tiny-draft "$tmp/draft2" >/dev/null &
wait
cmp -s "$tmp/draft1/model.safetensors" "$tmp/draft2/model.safetensors" && ok \
  || bad "two drafts for the built-in model differ"
builtin=$(find "$cache" -mindepth 1 -maxdepth 1)
for f in config.json model.safetensors tokenizer.json; do
  cmp -s "$tmp/tiny_bf16/$f" "$builtin/$f" && ok || bad "built-in $f differs from m3 tiny defaults"
done
expect_eq "no temporary folders left" "$(find "$cache" -mindepth 1 -maxdepth 1 | wc -l)" 1

# ---- bad input: exit 2, one line naming the file, tensor or key ----
mkdir -p "$tmp/empty"
expect_input_error config.json inspect --model "$tmp/empty"
mkdir -p "$tmp/badjson" && printf '{"text_config": {' >"$tmp/badjson/config.json"
expect_input_error config.json inspect --model "$tmp/badjson"

cp -r "$tmp/tiny_bf16" "$tmp/trunc"
truncate -s 100000 "$tmp/trunc/model.safetensors"
expect_input_error model.safetensors inspect --model "$tmp/trunc"

# An index that puts one tensor in a shard that is not there.
cp -r "$tmp/tiny_bf16" "$tmp/shards"
mv "$tmp/shards/model.safetensors" "$tmp/shards/model-00001-of-00002.safetensors"
header "$tmp/shards/model-00001-of-00002.safetensors" | jq '{metadata: {}, weight_map: (del(.__metadata__)
  | with_entries(.value = "model-00001-of-00002.safetensors")
  | .["language_model.model.norm.weight"] = "model-00002-of-00002.safetensors")}' \
  >"$tmp/shards/model.safetensors.index.json"
expect_input_error model-00002-of-00002.safetensors inspect --model "$tmp/shards"

# q_proj stored [64, 128] instead of [128, 64]: same bytes, so only the shape check can catch it.
cp -r "$tmp/tiny_bf16" "$tmp/shape"
f=$tmp/shape/model.safetensors
n=$(od -An -tu8 -N8 "$f" | tr -d ' ')
new=$(header "$f" | jq -c '."language_model.model.layers.0.self_attn.q_proj.weight".shape |= reverse')
{ head -c 8 "$f"; printf '%-*s' "$n" "$new"; tail -c +$((9 + n)) "$f"; } >"$tmp/shape.st"
mv "$tmp/shape.st" "$f"
expect_input_error layers.0.self_attn.q_proj.weight inspect --model "$tmp/shape"

# A config with fewer layers than the checkpoint: the extra tensors are reported by name.
cp -r "$tmp/tiny_bf16" "$tmp/fewer"
jq '.text_config.num_hidden_layers = 3 | .text_config.layer_types |= .[:3] | .text_config.mlp_layer_types |= .[:3]' \
  "$tmp/tiny_bf16/config.json" >"$tmp/fewer/config.json"
expect_input_error layers.3 inspect --model "$tmp/fewer"

expect_input_error "--ctx" inspect --model "$full" --ctx 0
expect_input_error "unknown argument" inspect --model "$full" --bogus
expect_input_error "XY" tiny "$tmp/x" --layers FD,XY
expect_input_error "--dtype" tiny "$tmp/x" --dtype f16
expect_input_error "missing DIR" tiny

check_summary
