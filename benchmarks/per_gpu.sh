#!/usr/bin/env bash
# h200.sh step lists run side by side on a machine with several GPUs, one list per GPU:
# argument i (steps separated by spaces, so no step may hold a space) runs on GPU i only
# (CUDA_VISIBLE_DEVICES=i), its output in $OUT/gpuI/run.log and its files under $OUT/gpuI/.
# Exit 1 if any list failed.
#   bash benchmarks/per_gpu.sh "soak-straight" "soak-resume"
set -uo pipefail
OUT=${OUT:-/tmp/hsae-out}
mkdir -p "$OUT"
# installs once (the lists then share it) and prints the versions
bash benchmarks/h200.sh 2>&1 | tee "$OUT/versions.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "install failed: see $OUT/versions.log"; exit 1; }
pids=()
i=0
for steps in "$@"; do
  mkdir -p "$OUT/gpu$i"
  read -ra list <<<"$steps"
  CUDA_VISIBLE_DEVICES=$i OUT="$OUT/gpu$i" bash benchmarks/h200.sh "${list[@]}" \
    >"$OUT/gpu$i/run.log" 2>&1 &
  pids+=("$!")
  i=$((i + 1))
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for ((j = 0; j < i; j++)); do echo "=== gpu$j"; tail -n 25 "$OUT/gpu$j/run.log"; done
exit $status
