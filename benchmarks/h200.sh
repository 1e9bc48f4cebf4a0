#!/usr/bin/env bash
# GPU runs on the lent H200 (python3.12 stack, no network): installs the carried
# jax-triton wheel from .whl/, prints versions, then runs each requested step, with logs
# and JSON under $OUT. Usage: bash benchmarks/h200.sh STEP [STEP ...]
# STACK=0.4 (with carry [".whl37"]) runs on jax-triton 0.4.1 + Triton 3.7.1 instead of the
# machine's Triton 3.6 + jax-triton 0.3.1: .whl37/ holds jax_triton-0.4.1-py3-none-any.whl and
# triton371-slim.tar.xz (the Triton 3.7.1 cp312 wheel unpacked, libtriton.so stripped of
# debug symbols, without the Blackwell ptxas, cupti and profiler test libraries, so that it
# fits one call's 64 MiB).
# Several GPUs: CUDA_VISIBLE_DEVICES picks the GPU(s) a run sees; benchmarks/per_gpu.sh
# starts runs side by side, one per GPU.
#   tests        pytest -m gpu (the triton backend against the oracle and reference), 4 workers
#   bench-loss   hsae bench (decoder loss) with the seed's torch kernel from .seed/
#   sweep        benchmarks/sweep_loss.py (kernel variants and block sizes)
#   seed-jt      benchmarks/seed_via_jax_triton.py (the seed's kernels through jax-triton)
#   floor        benchmarks/loss_floor.py (gather-only / scatter-only walks beside the fused kernel)
#   sweep-topk   benchmarks/sweep_topk.py (top-k methods and launch settings, torch.topk)
#   bench-step   hsae bench --step (whole training steps and their pieces)
#   bench-train  hsae bench --train (the trainer's loop: synthetic, .npy f32/f16, f16 cache,
#                dead latents with and without AuxK; D=2304, F=65536, K=64, B=4096)
#   train        hsae train at D=2304, F=65536, K=64, batch 4096 (copies metrics to $OUT)
#   loader       benchmarks/loader_h200.py: the step alone (float32 / float16 input), the loader
#                alone (1-8 threads) and both together, against the synthetic loop
#   auxk-pieces  benchmarks/auxk_pieces.py (AuxK alone at several dead fractions, its pieces)
#   soak         benchmarks/soak.py: 20k steps killed at 12345 and resumed, deterministic
#   soak-straight / soak-resume   the same split over two calls (each under 10 minutes):
#                the uninterrupted run, then the killed and resumed one; join the two
#                soak.json here with: python benchmarks/soak.py --merge A B --out C
#   shard        benchmarks/shard_h200.py: the one-device sharded step against the replicated
#                one, and the largest F that trains on one GPU (D=2304, K=64, B=4096)
#   profile      benchmarks/profile_step.py: the trainer's step traced (jax.profiler) and its
#                device time per piece: K=128 fp32 and bf16, K=64 with 10% of the latents dead
#   profile-mesh the same on 2 GPUs, K=64: mesh data=2 (4096 rows each) and model=2
#   profile-blocks the step with the low-memory options at F = 2^19, K = 64: the update
#                whole (--update-blocks 0) and in 64 blocks
#   hlo          benchmarks/step_hlo.py: the compiled step's host round trips (conds) and big
#                copies / converts / transposes: K=128 fp32 and bf16, K=64 with 10% dead
#   plan         hsae plan --compile at F = 2^18, 2^19, 2^20 (XLA's memory beside the estimate)
#   "pytest:ARGS" pytest with ARGS (separated by ';'), e.g. "pytest:-m;gpu;-k;a or b;tests"
#   "bench:ARGS"  hsae bench with ARGS (separated by ';')
#   "wait-for:PATH" waits until PATH exists (a file another GPU's run writes), 10 minutes at most
#   "py:ARGS"     python3 with ARGS (separated by ';'), e.g. "py:benchmarks/shard_h200.py;--mode;step"
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# NVLink multicast stays off on the lent multi-GPU machines (device tool's KINDS.md)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/hsae-out}
mkdir -p "$OUT"
if [ "${STACK:-0.3}" = "0.4" ]; then  # once per machine, as below
  if [ ! -d /tmp/site2/jax_triton ]; then
    mkdir -p /tmp/site2 && tar -C /tmp/site2 -xJf .whl37/triton371-slim.tar.xz || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 \
      .whl37/jax_triton-0.4.1-py3-none-any.whl || exit 1
  fi
  export PYTHONPATH="/tmp/site2:$PWD"
else  # once per machine: runs started side by side (one per GPU) share the install
  [ -d /tmp/site/jax_triton ] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 - <<'PY'
import jax, jaxlib, triton, torch, flax, optax, chex
import hsae_jax.backends as b
print(f"jax {jax.__version__} jaxlib {jaxlib.__version__} triton {triton.__version__} "
      f"torch {torch.__version__} flax {flax.__version__} optax {optax.__version__}")
print("devices", jax.devices(), "triton_available", b.triton_available())
import jax_triton; print("jax_triton", jax_triton.__version__)
PY
status=0
for step in "$@"; do
  echo "=== $step"
  case "$step" in
    tests) python3 -m pytest -m gpu -q -p no:cacheprovider -n 4 tests 2>&1 \
        | tee "$OUT/gpu_tests${STACK:+-$STACK}.log" ;;
    sweep) python3 benchmarks/sweep_loss.py --seed-module .seed/hierarchical_kernels.py \
        --out "$OUT/sweep_loss.json" 2>&1 | tee "$OUT/sweep.log" ;;
    seed-jt) python3 benchmarks/seed_via_jax_triton.py --seed-module .seed/hierarchical_kernels.py \
        --out "$OUT/seed_via_jax_triton.json" 2>&1 | tee "$OUT/seed_via_jax_triton.log" ;;
    floor) python3 benchmarks/loss_floor.py --configs 4x64x2x4,4x128x4x4 \
        --out "$OUT/loss_floor.json" 2>&1 | tee "$OUT/loss_floor.log" ;;
    sweep-topk) python3 benchmarks/sweep_topk.py --out "$OUT/sweep_topk.json" 2>&1 \
        | tee "$OUT/sweep_topk.log" ;;
    bench-loss) python3 -m hsae_jax.cli bench --iters 20 --seed-module .seed/hierarchical_kernels.py \
        --out "$OUT/bench_loss.json" 2>&1 | tee "$OUT/bench_loss.log" ;;
    bench-step) python3 -m hsae_jax.cli bench --step --seed-module .seed/hierarchical_kernels.py \
        --out "$OUT/bench_step.json" 2>&1 | tee "$OUT/bench_step.log" ;;
    bench-train) python3 -m hsae_jax.cli bench --train --work-dir /tmp/bench-train \
        --out "$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.log" ;;
    train) rm -rf /tmp/hsae-run && python3 -m hsae_jax.cli train --out /tmp/hsae-run \
        --no-progress --backend triton --d-model 2304 --n-latents 65536 --k 64 \
        --batch-size 4096 --steps 400 --synthetic-features 16384 --synthetic-active 48 \
        --log-every 25 --eval-every 200 --save-every 400 2>&1 | tee "$OUT/train.log"
      cp /tmp/hsae-run/metrics.json /tmp/hsae-run/metrics.jsonl /tmp/hsae-run/fvu_vs_k.png "$OUT/" ;;
    loader) python3 benchmarks/loader_h200.py --out "$OUT/loader.json" 2>&1 \
        | tee "$OUT/loader.log" ;;
    auxk-pieces) python3 benchmarks/auxk_pieces.py --out "$OUT/auxk_pieces.json" 2>&1 \
        | tee "$OUT/auxk_pieces.log" ;;
    soak) rm -rf /tmp/hsae-soak && python3 benchmarks/soak.py --steps 20000 \
        --save-every 1000 --kill-step 12345 --d-model 2304 --n-latents 65536 --k 64 \
        --batch-size 4096 --backend triton --deterministic --out /tmp/hsae-soak 2>&1 \
        | tee "$OUT/soak.log"
      cp /tmp/hsae-soak/soak.json /tmp/hsae-soak/soak.png "$OUT/" ;;
    soak-straight|soak-resume)
      phases=straight; [ "$step" = soak-resume ] && phases=killed,resumed
      rm -rf "/tmp/$step" && python3 benchmarks/soak.py --phases $phases --steps 20000 \
        --save-every 1000 --kill-step 12345 --d-model 2304 --n-latents 65536 --k 64 \
        --batch-size 4096 --backend triton --deterministic --out "/tmp/$step" 2>&1 \
        | tee "$OUT/$step.log"
      mkdir -p "$OUT/$step" && cp "/tmp/$step/soak.json" "/tmp/$step/soak.png" "$OUT/$step/" ;;
    shard) python3 benchmarks/shard_h200.py --backend triton --out "$OUT/shard_h200.json" 2>&1 \
        | tee "$OUT/shard_h200.log" ;;
    profile-mesh) for mesh in "data=2,model=1" "data=1,model=2"; do  # 2 GPUs or more
        python3 benchmarks/profile_step.py --k 64 --mesh "$mesh" \
          --out "$OUT/profile_k64_${mesh//[=,]/_}.json"; done 2>&1 | tee "$OUT/profile_mesh.log" ;;
    profile-blocks) for blocks in 0 64; do  # the update whole and in 64 blocks, F = 2^19
        python3 benchmarks/profile_step.py --k 64 --n-latents 524288 --low-memory \
          --update-blocks $blocks --out "$OUT/profile_low_blocks${blocks}.json"; done 2>&1 \
        | tee "$OUT/profile_blocks.log" ;;
    plan) for f in 262144 524288 1048576; do python3 -m hsae_jax.cli plan --compile \
        --backend triton --n-latents $f --d-model 2304 --k 64 --batch-size 4096 --mesh data=1,model=1; \
        done 2>&1 | tee "$OUT/plan.log" ;;
    profile) for spec in "128 float32 0" "128 bfloat16 0" "64 float32 0.1"; do
        read -r k dtype dead <<<"$spec"
        python3 benchmarks/profile_step.py --k "$k" --compute-dtype "$dtype" --dead "$dead" \
          --out "$OUT/profile_k${k}_${dtype}_dead${dead}.json"; done 2>&1 | tee "$OUT/profile.log" ;;
    hlo) for spec in "128 float32 0" "128 bfloat16 0" "64 float32 0.1"; do
        read -r k dtype dead <<<"$spec"
        python3 benchmarks/step_hlo.py --k "$k" --compute-dtype "$dtype" --dead "$dead" \
          --out "$OUT/step_hlo_k${k}_${dtype}_dead${dead}.json"; done 2>&1 | tee "$OUT/step_hlo.log" ;;
    pytest:*) IFS=';' read -ra a <<<"${step#pytest:}"
      python3 -m pytest -q -p no:cacheprovider "${a[@]}" 2>&1 | tee -a "$OUT/pytest.log" ;;
    bench:*) IFS=';' read -ra a <<<"${step#bench:}"
      python3 -m hsae_jax.cli bench "${a[@]}" 2>&1 | tee -a "$OUT/bench.log" ;;
    wait-for:*) path=${step#wait-for:}; waited=0  # at most 10 minutes
      until [ -e "$path" ] || [ $waited -ge 600 ]; do sleep 5; waited=$((waited + 5)); done
      [ -e "$path" ] || { echo "gave up waiting for $path"; false; } ;;
    py:*) IFS=';' read -ra a <<<"${step#py:}"
      python3 "${a[@]}" 2>&1 | tee -a "$OUT/py.log" ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
