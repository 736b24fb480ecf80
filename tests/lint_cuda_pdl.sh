#!/bin/bash
# lint_cuda_pdl.sh: every kernel of the CUDA backend may start before the kernel ahead of it on
# the stream has finished (dev_launch's programmatic dependent launch, cuda_internal.h), so its
# first statement must be dev_pdl_enter() or dev_pdl_wait(), before it reads anything that kernel
# wrote; and every launch goes through dev_launch (a <<<>>> launch would not start early, but a
# kernel after it would then wait for nothing). $1: the source tree. Exits 1 naming each kernel
# or launch at fault.
src=${1:?usage: lint_cuda_pdl.sh SOURCE_DIR}
dir=$src/src/backend/cuda
status=0
found=0
for f in "$dir"/*.cu "$dir"/*.cuh "$dir"/*.h; do
  [ -e "$f" ] || continue
  # After __global__ (not a declaration): the line holding the body's "{", then the first line of
  # the body that is neither blank nor comment.
  out=$(awk -v file="$f" '
    state == 0 && /__global__/ { state = 1; at = NR }
    state == 1 {
      b = index($0, "{"); s = index($0, ";")
      if (s && (!b || s < b)) { state = 0; next }  # a declaration
      if (b) { state = 2; kernels++; next }
      next
    }
    state == 2 {
      if ($0 ~ /^[ \t]*$/ || $0 ~ /^[ \t]*(\/\*|\*)/) next
      if ($0 !~ /^[ \t]*dev_pdl_(enter|wait)\(\);/) printf "%s:%d: kernel without dev_pdl_enter() or dev_pdl_wait() first\n", file, at
      state = 0
    }
    END { printf "kernels %d\n", kernels }' "$f")
  found=$((found + $(printf '%s\n' "$out" | sed -n 's/^kernels //p')))
  if printf '%s\n' "$out" | grep -v '^kernels ' | grep .; then status=1; fi
  if grep -n '<<<' "$f" | sed "s|^|$f:|;s|$| (launch with dev_launch)|" | grep .; then status=1; fi
done
if [ "$found" -eq 0 ]; then
  echo "no kernels found under $dir"
  status=1
fi
[ $status -eq 0 ] && echo "$found kernels start with dev_pdl_enter or dev_pdl_wait; no <<<>>> launches"
exit $status
