#!/usr/bin/env bash
# Runs the m3 CLI paths under valgrind --leak-check=full on a plain (non-sanitized) build in
# build-valgrind/: every command on small inputs, a few bad-input paths (they free what they
# opened too), and `m3 serve` answering requests and stopping on SIGTERM. A path passes when m3
# exits with the status it should and valgrind reports no invalid access, no uninitialised value
# used and no leak (definite, indirect or possible). Prints one line per path and a summary.
#   scripts/valgrind.sh [--m3 BIN] [--bench-ops]
# --m3 BIN: an already built binary instead of building one. --bench-ops adds `m3 bench ops`,
# which has no size flags for its copy (2 x 512 MiB) and attention timings and takes about ten
# minutes under valgrind.
set -uo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build() { # build MEDIA: the m3 target in build-valgrind with -DM3_MEDIA=MEDIA
  cmake -S "$src" -B "$src/build-valgrind" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DM3_CUDA=OFF \
    -DM3_MEDIA="$1" >/dev/null && cmake --build "$src/build-valgrind" --target m3 >/dev/null || exit 1
}
m3=
bench_ops=0
while [ $# -gt 0 ]; do
  case $1 in
    --m3) m3=$2; shift ;;
    --bench-ops) bench_ops=1 ;;
    *) echo "valgrind.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$m3" ]; then
  m3=$src/build-valgrind/m3
  build ON
  # valgrind 3.19 decodes RDTSCP only where CPUID reports it; libhwy (loaded by libavcodec through
  # libjxl) runs it at load time, so on hosts that hide the flag the codec build cannot start
  # under valgrind. There the text paths run on a -DM3_MEDIA=OFF build, whose media paths are
  # checked as refusals.
  if ! valgrind --quiet "$m3" --help >/dev/null 2>&1; then
    echo "note: valgrind cannot start the build with codecs here (RDTSCP in libhwy); using -DM3_MEDIA=OFF"
    build OFF
  fi
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A fresh cache, so tiny-draft without --model also writes the built-in model.
export M3_CACHE=$tmp/cache
media=$src/tests/fixtures/vision/media
# 99 tells a valgrind error from m3's own exit statuses (0, 1, 2).
vg=(valgrind --quiet --leak-check=full --show-leak-kinds=definite,indirect,possible
    --errors-for-leak-kinds=definite,indirect,possible --error-exitcode=99 --num-callers=30)
pass=0
fail=0

# path NAME WANT_STATUS ARGS...: runs `m3 ARGS` under valgrind with stdin from $tmp/stdin.
path() {
  local name=$1 want=$2
  shift 2
  local t0=$SECONDS
  "${vg[@]}" --log-file="$tmp/$name.vg" "$m3" "$@" <"$tmp/stdin" >"$tmp/$name.out" 2>"$tmp/$name.err"
  report "$name" "$want" $? $((SECONDS - t0))
}

report() {
  local name=$1 want=$2 got=$3 secs=$4
  if [ "$got" -eq "$want" ] && [ ! -s "$tmp/$name.vg" ]; then
    pass=$((pass + 1))
    printf 'ok    %-22s exit %s, %3d s\n' "$name" "$got" "$secs"
  else
    fail=$((fail + 1))
    printf 'FAIL  %-22s exit %s (want %s), %3d s\n' "$name" "$got" "$want" "$secs"
    tail -n 5 "$tmp/$name.err"
    head -n 60 "$tmp/$name.vg"
  fi
}

: >"$tmp/stdin"
# The default model (models/m3-small, ~11M parameters) only where it is quick: a turn of chat on
# it takes minutes under valgrind, so chat and serve run on the tiny model.
path run-default 0 run --max-tokens 3
path tiny 0 tiny "$tmp/tiny" --seed 3
path tiny-mxfp8 0 tiny "$tmp/mxfp8" --dtype mxfp8
path tiny-draft 0 tiny-draft "$tmp/draft" --model "$tmp/tiny"
path tiny-draft-builtin 0 tiny-draft "$tmp/draft-builtin"
path inspect 0 inspect --model "$tmp/tiny" --ctx 100
path inspect-json 0 inspect --json
printf 'hello <mm:think> wörld\n' >"$tmp/text"
path tokenize 0 tokenize --model "$tmp/tiny" --file "$tmp/text" --json
path detokenize 0 detokenize --model "$tmp/tiny" --ids 1,2,3,200 --skip-special
path run-sampled 0 run --model "$tmp/tiny" --prompt "The quick" --max-tokens 4 --temperature 0.8 \
  --top-k 5 --top-p 0.9 --min-p 0.05 --seed 7
path run-mxfp8 0 run --model "$tmp/mxfp8" --ids 1,2,3 --max-tokens 3
path run-mtp 0 run --model "$tmp/tiny" --ids 1,2,3 --max-tokens 4 --speculative mtp --num-draft 2
path run-eagle3 0 run --model "$tmp/tiny" --ids 1,2,3 --max-tokens 4 --speculative eagle3 \
  --draft "$tmp/draft" --num-draft 2
# The media paths generate with codecs and are refused (exit 2) without them.
"$m3" run --model "$tmp/tiny" --image "$media/tiny_23x9.png" --max-tokens 1 >/dev/null 2>&1
media_want=$?
path run-image $media_want run --model "$tmp/tiny" --image "$media/tiny_23x9.png" --prompt describe \
  --max-tokens 2
path run-video $media_want run --model "$tmp/tiny" --video "$media/clip_16f_2fps.mkv" --prompt describe \
  --max-tokens 2
path logits 0 logits --model "$tmp/tiny" --ids 1,2,3,4,5 --chunk 2 --out "$tmp/logits.f32" \
  --blocks-out "$tmp/blocks.i32"
path perplexity 0 perplexity --model "$tmp/tiny" --file "$tmp/text" --ctx 4 --json
printf '/system Be brief.\nhello\n/think off\nhow are you\n/reset\nhi\n/quit\n' >"$tmp/stdin"
path chat 0 chat --model "$tmp/tiny" --max-tokens 4 --seed 1
: >"$tmp/stdin"
[ "$bench_ops" -eq 1 ] && path bench-ops 0 bench ops --gemv 64x64 --gemm 64x64 --seconds 0.01 --threads 2
path bench-model 0 bench model --model "$tmp/tiny" --threads 1 --ctx 16 --prefill 8 --decode 2 --copy-mib 8
path bench-engine 0 bench engine --model "$tmp/tiny" --prompt-tokens 8 --gen-tokens 4 --max-concurrency 2
path bench-tok 0 bench tok --model "$tmp/tiny" --file "$tmp/text" --repeat 1
path bench-spec 0 bench spec --model "$tmp/tiny" --draft "$tmp/draft" --context 8 --repeat 1 --threads 1
# Bad input: exit 2 with one line, nothing leaked on the way out.
path bad-model 2 run --model "$tmp/nothing" --max-tokens 1
path bad-ids 2 run --model "$tmp/tiny" --ids 1,100000
path bad-image $((media_want == 0 ? 2 : media_want)) run --model "$tmp/tiny" \
  --image "$src/tests/fixtures/vision/reference.json" --prompt x
path bad-perplexity 2 perplexity --model "$tmp/tiny" --file "$tmp/missing.txt"
path bad-flag 2 chat --temperature hot
path bad-command 2 nope

# serve: each API streamed and not, tokenize, a bad body, a client hanging up mid-stream (its
# request cancelled), then SIGTERM; the server must exit 0.
t0=$SECONDS
"${vg[@]}" --log-file="$tmp/serve.vg" "$m3" serve --model "$tmp/tiny" --port 0 >"$tmp/serve.out" \
  2>"$tmp/serve.err" &
pid=$!
url=
for _ in $(seq 1200); do # valgrind makes the start slow: up to 120 s
  url=$(sed -n 's/^listening on \(http:.*\)$/\1/p' "$tmp/serve.out")
  [ -n "$url" ] || ! kill -0 "$pid" 2>/dev/null && break
  sleep 0.1
done
if [ -n "$url" ]; then
  node --input-type=module -e '
    const [url] = process.argv.slice(1);
    const hi = [{role: "user", content: "hi"}];
    const calls = [["/v1/chat/completions", {messages: hi, max_tokens: 3}, 200],
                   ["/v1/completions", {prompt: "hi", max_tokens: 3}, 200],
                   ["/v1/messages", {messages: hi, max_tokens: 3}, 200],
                   ["/tokenize", {prompt: "hi"}, 200],
                   ["/v1/chat/completions", "{\"messages\": [", 400]];
    for (const [path, body, want] of calls)
      for (const stream of want === 200 && path.startsWith("/v1") ? [false, true] : [false]) {
        const r = await fetch(`${url}${path}`, {method: "POST",
          body: typeof body === "string" ? body : JSON.stringify({...body, stream})});
        await r.text();
        if (r.status !== want) throw new Error(`${path}: status ${r.status}`);
      }
    const ac = new AbortController();
    const r = await fetch(`${url}/v1/completions`, {method: "POST", signal: ac.signal,
      body: JSON.stringify({prompt: "hi", max_tokens: 2000, ignore_eos: true, stream: true})});
    await r.body.getReader().read();
    ac.abort();
    for (let i = 0; ; i++) { /* the cancelled request ends and frees its pages */
      const m = await (await fetch(`${url}/metrics`)).text();
      if (/^m3_requests_finished_total{reason="cancelled"} 1$/m.test(m)) break;
      if (i === 600) throw new Error("the request of the client that hung up was not cancelled");
      await new Promise((done) => setTimeout(done, 100));
    }' "$url" >>"$tmp/serve.err" 2>&1 || echo "the requests failed" >>"$tmp/serve.vg"
fi
kill -TERM "$pid" 2>/dev/null
wait "$pid"
report serve 0 $? $((SECONDS - t0))

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
