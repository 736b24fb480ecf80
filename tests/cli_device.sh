#!/bin/bash
# --device on the commands that run the engine (run, chat, serve): a name that is no device is an
# input error naming it (exit 2, one line); cuda where there is no GPU (this CI machine, or a
# build without the CUDA backend) fails with one line naming cuda (exit 1), before any server
# starts listening; where a GPU exists the command runs.
m3=$1
src=$2
. "$src/tests/check.sh"

declare -A args=([run]="--prompt x --max-tokens 1" [chat]="--max-tokens 1" [serve]="--port 0")
for cmd in run chat serve; do
  expect_input_error "device 'gpu'" $cmd --device gpu ${args[$cmd]}
  err=$(echo | timeout 60 "$m3" $cmd --device cuda ${args[$cmd]} 2>&1 >/dev/null)
  rc=$?
  if [ "$rc" -eq 1 ] && [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] && [[ "$err" == *"cuda"* ]]; then ok
  elif [ "$rc" -eq 0 ] && [ "$cmd" != serve ]; then ok # a machine with a GPU
  else bad "m3 $cmd --device cuda: exit $rc, '$err'"; fi
done
check_summary
