#!/bin/bash
# m3 run --image / --video on a tiny VL model from `m3 tiny` (it has a vision tower and M3's
# image markers): each image adds its placeholder run (start + N image ids + end) to the prompt,
# a video its timestamped runs; a different picture changes the greedy continuation;
# undecodable, truncated or missing media fail with exit 2 and a message naming the file; the
# default model (text only) refuses media by name.
m3=$1
src=$2
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { echo "FAIL: $*" >&2; fail=$((fail + 1)); }
media=$src/tests/fixtures/vision/media
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
vl=$tmp/vl
"$m3" tiny "$vl" > /dev/null || bad "m3 tiny"

prompt_tokens() { sed -n 's/^prompt: \([0-9]*\) tokens.*/\1/p' "$1"; }

"$m3" run --model "$vl" --prompt "describe" --max-tokens 4 > "$tmp/plain" 2> "$tmp/plain.err" && ok || bad "plain run: $(cat "$tmp/plain.err")"
base=$(prompt_tokens "$tmp/plain.err")

# rgba_97x61.png -> 56x84 -> 6 tokens; tiny_23x9.png -> 56x112 -> 8 tokens; +2 markers each.
"$m3" run --model "$vl" --image "$media/rgba_97x61.png" --image "$media/tiny_23x9.png" --prompt "describe" \
  --max-tokens 4 > "$tmp/two" 2> "$tmp/two.err" && ok || bad "two images: $(cat "$tmp/two.err")"
[ "$(prompt_tokens "$tmp/two.err")" = "$((base + 18))" ] && ok \
  || bad "two images: prompt $(prompt_tokens "$tmp/two.err") tokens, expected $((base + 18))"

"$m3" run --model "$vl" --image "$media/large_1000x700_exif6.jpg" --prompt "describe" --max-tokens 4 \
  > "$tmp/large" 2> "$tmp/large.err" && ok || bad "large: $(cat "$tmp/large.err")"
# 700x1000 after EXIF -> 560x784 -> 20 x 28 = 560 tokens.
[ "$(prompt_tokens "$tmp/large.err")" = "$((base + 562))" ] && ok \
  || bad "large: prompt $(prompt_tokens "$tmp/large.err") tokens, expected $((base + 562))"

"$m3" run --model "$vl" --image "$media/tiny_23x9.png" --prompt "describe" --max-tokens 8 > "$tmp/a" 2>/dev/null
"$m3" run --model "$vl" --image "$media/pattern.png" --prompt "describe" --max-tokens 8 > "$tmp/b" 2>/dev/null
# tiny_23x9.png -> 56x112 (8 tokens), pattern.png 40x30 -> 84x56 (6 tokens): different pictures,
# different continuations.
cmp -s "$tmp/a" "$tmp/b" && bad "two different pictures gave the same continuation" || ok

# 16 frames at 2 fps, 1 frame/s -> 8 frames -> 4 temporal patches of 6 tokens (+ markers, + text).
"$m3" run --model "$vl" --video "$media/clip_16f_2fps.mkv" --prompt "describe" --max-tokens 4 \
  > "$tmp/video" 2> "$tmp/video.err" && ok || bad "video: $(cat "$tmp/video.err")"
[ "$(prompt_tokens "$tmp/video.err")" -gt "$((base + 32))" ] && ok \
  || bad "video: prompt $(prompt_tokens "$tmp/video.err") tokens, expected more than $((base + 32))"

head -c 3000 "$media/large_1000x700_exif6.jpg" > "$tmp/cut.jpg"
for f in "$src/tests/fixtures/vision/reference.json" "$tmp/cut.jpg" "$tmp/missing.png"; do
  "$m3" run --model "$vl" --image "$f" --prompt "describe" > /dev/null 2> "$tmp/err"
  rc=$?
  [ $rc -eq 2 ] && ok || bad "$f: exit $rc, expected 2"
  grep -q "$(basename "$f")" "$tmp/err" && ok || bad "$f: message does not name it: $(cat "$tmp/err")"
done
"$m3" run --model "$vl" --video "$src/tests/fixtures/vision/reference.json" --prompt "x" > /dev/null 2> "$tmp/err"
[ $? -eq 2 ] && grep -q reference.json "$tmp/err" && ok || bad "bad video: $(cat "$tmp/err")"

"$m3" run --image "$media/tiny_23x9.png" --prompt "describe" > /dev/null 2> "$tmp/err"
rc=$?
[ $rc -eq 1 ] && grep -q "no vision tower" "$tmp/err" && ok || bad "image on the default model: exit $rc, $(cat "$tmp/err")"

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
