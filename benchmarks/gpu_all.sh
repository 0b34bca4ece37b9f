#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md on a CUDA machine, in two parts that can run as separate calls:
#   benchmarks/gpu_all.sh OUTDIR epoch [WHEELDIR]   set-up, rehearsal + prepare, one epoch of seed_best (gpu_epoch.py)
#   benchmarks/gpu_all.sh OUTDIR steps [WHEELDIR]   the train-step variants against the card's peak (gpu_step.py)
#   benchmarks/gpu_all.sh OUTDIR compile [WHEELDIR] `deepsports train` (synthetic, base 8 x 224, batch 32, 3 epochs)
#                                                   with compile=false, then compile=true: clips/s per epoch
# WHEELDIR (optional) holds wheels of what the machine lacks (PyAV, mlflow-skinny and its needs) and the
# torchsort sdist, for a machine without package registries; they go to /tmp/site, torchsort is built there.
set -uo pipefail
OUT=${1:?usage: gpu_all.sh OUTDIR epoch|steps [WHEELDIR]}; PART=${2:?}; WHL=${3:-}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
if [ -n "$WHL" ] && [ ! -f /tmp/site/.installed ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl && touch /tmp/site/.installed
fi
if ! "$PY" -c "import torchsort" 2>/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")") TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 \
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site "$WHL"/torchsort-*.tar.gz \
    >"$OUT/torchsort_build.log" 2>&1 &
  TS=$!
fi
WORK=/tmp/gpuepoch
if [ "$(df --output=avail -B1G /dev/shm | tail -1)" -gt 60 ]; then WORK=/dev/shm/gpuepoch; fi
case "$PART" in
  epoch)
    { nproc; free -g; df -h /dev/shm /tmp; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } >"$OUT/machine.txt" 2>&1
    "$PY" benchmarks/gpu_epoch.py --workdir "$WORK" --stages gen,prepare --json "$OUT/gpu_epoch.json"
    [ -n "${TS:-}" ] && { wait "$TS"; tail -3 "$OUT/torchsort_build.log"; }
    "$PY" benchmarks/gpu_epoch.py --workdir "$WORK" --stages train --json "$OUT/gpu_epoch.json"
    cp "$WORK/train.log" "$OUT/train.log" 2>/dev/null; tail -c 20000 "$WORK/nvidia_smi.csv" >"$OUT/nvidia_smi_tail.csv" 2>/dev/null
    ;;
  steps)
    [ -n "${TS:-}" ] && { wait "$TS"; tail -3 "$OUT/torchsort_build.log"; }
    "$PY" benchmarks/gpu_step.py --json "$OUT/gpu_step.json" ${VARIANTS:+--variants "$VARIANTS"}
    ;;
  compile)
    [ -n "${TS:-}" ] && { wait "$TS"; tail -3 "$OUT/torchsort_build.log"; }
    export MLFLOW_TRACKING_URI=file://$WORK/mlruns MLFLOW_ALLOW_FILE_STORE=true DEEPSPORTS_CACHE_DIR=$WORK/cache
    for c in false true; do
      "$PY" -m deepsports train dataset=synthetic synth_clips=320 backbone=base frame_num=8 spatial_size=224 \
        batch_size=32 epochs=3 warmup_epochs=0 num_workers=6 evaluate=false log_model=false log_checkpoint=false \
        resume=never checkpoint_dir="$WORK/ckpt-compile-$c" experiment_name=gpu-compile run_name="compile-$c" \
        compile=$c 2>&1 | tee "$OUT/train_compile_$c.log" | grep -E "epoch [0-9]+/[0-9]+:|Error|error" 
    done
    ;;
  *) echo "gpu_all.sh: part must be epoch, steps or compile, got $PART" >&2; exit 2 ;;
esac
