#!/bin/bash
# m3 chat on a tiny model from `m3 tiny` with piped input. Greedy decoding makes a reply a
# function of the conversation so far, so the checks compare whole outputs of different scripts:
# a conversation's output is the concatenation of its replies, /reset starts over (the first
# reply after it equals the very first), the second reply depends on the first turn (history),
# /system and /think equal their flags, the two multi-line forms give the same message, /quit
# ends the input. Bad flags exit 2 naming the flag. Without --model the default model chats.
m3=$1
src=$2
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { echo "FAIL: $*" >&2; fail=$((fail + 1)); }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$m3" tiny "$tmp/tiny" > /dev/null || bad "m3 tiny"

# chat NAME INPUT [FLAGS...]: runs greedy with INPUT on stdin; stdout to $tmp/NAME.
chat() {
  local name=$1 input=$2
  shift 2
  printf '%b' "$input" | "$m3" chat --model "$tmp/tiny" --temperature 0 --seed 1 --max-tokens 8 "$@" \
    > "$tmp/$name" 2> "$tmp/$name.err"
  local rc=$?
  [ $rc -eq 0 ] && ok || bad "chat $name: exit $rc, $(cat "$tmp/$name.err")"
}
same() { cmp -s "$tmp/$1" "$tmp/$2" && ok || bad "$1 and $2 differ: '$(cat -v "$tmp/$1")' vs '$(cat -v "$tmp/$2")'"; }
differ() { cmp -s "$tmp/$1" "$tmp/$2" && bad "$1 and $2 are the same: '$(cat -v "$tmp/$1")'" || ok; }
cat_to() { local out=$1; shift; (cd "$tmp" && cat "$@") > "$tmp/$out"; }

chat first '/system Be brief.\nhello\n'
[ -s "$tmp/first" ] && ok || bad "no reply"
grep -q "M3 chat format" "$tmp/first.err" && ok || bad "no model line: $(cat "$tmp/first.err")"
chat two '/system Be brief.\nhello\nhow are you\n'
chat alone '/system Be brief.\nhow are you\n'
chat full '/system Be brief.\nhello\nhow are you\n/reset\nhello\n/quit\nnot read\n'
# two = first + second reply; the second reply saw the first turn.
[ "$(head -c "$(stat -c %s "$tmp/first")" "$tmp/two")" = "$(cat "$tmp/first")" ] && ok \
  || bad "the first reply of two turns differs from a one-turn chat"
tail -c +$(($(stat -c %s "$tmp/first") + 1)) "$tmp/two" > "$tmp/second"
[ -s "$tmp/second" ] && ok || bad "no second reply"
differ second alone
# /reset forgets both turns, the system prompt stays; /quit ends the input.
cat_to want_full two first
same full want_full
grep -q "cleared" "$tmp/full.err" && ok || bad "/reset said nothing"

# /system and /think equal --system and --think; each changes the reply.
chat sys_flag 'hello\n' --system 'Be brief.'
same sys_flag first
chat plain 'hello\n'
differ plain first
chat think_cmd '/think off\nhello\n'
chat think_flag 'hello\n' --think off
same think_cmd think_flag
differ think_cmd plain
chat think_on 'hello\n' --think on
[ "$(head -c 11 "$tmp/think_on")" = "[thinking] " ] && ok || bad "--think on: no [thinking] block: $(head -c 80 "$tmp/think_on")"

# Multi-line input: a """ block and backslash continuations give the same message, not the one
# with the lines joined by a space.
chat block '"""\nline one\nline two\n"""\n'
chat continued 'line one\\\nline two\n'
chat one_line 'line one line two\n'
same block continued
differ block one_line

# Unknown commands and empty lines are not messages; end of input quits.
chat odd '/frobnicate\n\nhello'
same odd plain
grep -q "unknown command '/frobnicate'" "$tmp/odd.err" && ok || bad "unknown command: $(cat "$tmp/odd.err")"

# The default model answers too (its text is the trained model's, not checked here).
printf 'hello\n' | "$m3" chat --temperature 0 --max-tokens 4 > "$tmp/default" 2> "$tmp/default.err"
[ $? -eq 0 ] && grep -q "M3 chat format" "$tmp/default.err" && ok \
  || bad "chat on the default model: '$(cat "$tmp/default")' $(cat "$tmp/default.err")"

for bad_flag in "--think maybe" "--temperature x" "--top-p 0" "--top-k -2" "--max-tokens -1" \
                "--seed z" "--threads q" "--bogus 1"; do
  "$m3" chat $bad_flag < /dev/null > /dev/null 2> "$tmp/err"
  rc=$?
  flag=${bad_flag%% *}
  [ $rc -eq 2 ] && grep -q -- "$flag" "$tmp/err" && ok || bad "$bad_flag: exit $rc, $(cat "$tmp/err")"
done
fx=$(dirname "$(ls "$src"/tests/fixtures/text/*/reference.json | head -n 1)")
"$m3" chat --model "$fx" < /dev/null > /dev/null 2> "$tmp/err"
rc=$?
[ $rc -eq 2 ] && grep -q "tokenizer.json" "$tmp/err" && ok || bad "model without a tokenizer: exit $rc, $(cat "$tmp/err")"

echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
