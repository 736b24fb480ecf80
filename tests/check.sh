# check.sh: what the shell tests (tests/cli_*.sh) share, sourced after they set m3 (the binary):
# a scratch folder removed on exit ($tmp), pass/fail counters and the checks below; the test
# ends with check_summary. (Named outside the cli_*.sh glob: it is not a test itself.)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*" >&2; }
expect_eq() { # name actual expected
  if [ "$2" = "$3" ]; then ok; else bad "$1: got '$2', expected '$3'"; fi
}
# Runs m3 with the remaining args; it must exit 2 with one stderr line containing $1.
expect_input_error() {
  local needle=$1
  shift
  local err rc
  err=$("$m3" "$@" 2>&1 >/dev/null)
  rc=$?
  if [ "$rc" -eq 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] && [[ "$err" == *"$needle"* ]]; then
    ok
  else
    bad "m3 $*: exit $rc, stderr '$err' (expected exit 2 and one line naming '$needle')"
  fi
}

# Waits (up to 60 s) until the server started as PID prints "listening on" into FILE, or exits.
wait_listening() { # file pid
  for _ in $(seq 600); do
    grep -q "^listening on" "$1" && return 0
    kill -0 "$2" 2> /dev/null || return 1
    sleep 0.1
  done
  return 1
}

# Prints the counts; the exit status is 0 when nothing failed.
check_summary() {
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}
