# stage.sh: `stage`, sourced by the device scripts (gpu-bench.sh, gpu-multi.sh) that run their
# steps under one time budget. The sourcing script sets:
#   deadline      the budget's end (seconds since the epoch)
#   stage_budget  the variable that sets the budget, named when a stage is skipped
#   stage_margin  seconds kept back for the script's summary
#   stage_logs    the folder of the logs; stage_prefix their name's prefix; stage_list the file
#                 that gets one line per stage
# stage NAME LIMIT_S CMD...: runs CMD under timeout (the smaller of LIMIT_S and the time left),
# stdout and stderr to $stage_logs/${stage_prefix}NAME.log; the exit status. A stage out of time
# gets a TIMEOUT line naming its last progress line (the "   ..." lines).
stage() {
  local name=$1 limit=$2
  shift 2
  local log=$stage_logs/$stage_prefix$name.log
  local left=$((deadline - $(date +%s) - stage_margin))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "$name: skipped, out of time ($stage_budget)" | tee "$log" >> "$stage_list"
    return 124
  fi
  local t0=$(date +%s)
  timeout "$limit" stdbuf -oL -eL "$@" > "$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "TIMEOUT after $limit s in: $(grep '^   ' "$log" | tail -n 1)" >> "$log"
  echo "$name: exit $rc in $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$stage_list"
  return $rc
}
