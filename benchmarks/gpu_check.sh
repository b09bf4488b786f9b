#!/usr/bin/env bash
# The GPU check of GMML pre-training, as one script a session with a GPU runs unchanged (a few minutes):
#
#   bash benchmarks/gpu_check.sh                 # ViT-S/16, 256 px, bf16, on cuda
#
# Prints, for the largest batch of BATCHES that fits:
#   1. the bare timm ViT step and the GMML step with augmentation + corruption in the step
#      (gmml.augment_on=step), images/s, MFU and their ratio, and the loader alone both ways;
#   2. the same GMML step under torch.compile;
#   3. the GMML step with augmentation + corruption in the loader workers (augment_on=loader);
#   4. the cost of the step's batched augmentation + corruption (GMMLViews) on the GPU and the CPU.
# Settings come from the environment: PYTHON, DEVICE (cuda), SIZE (256), BATCHES ("512 384 256 128"),
# CONFIG (pretrain/gmml_vit_s16), WORKERS (8), PEAK_TFLOPS (989: H100/H200 dense bf16), FUSED
# (--fused-attn). On a CPU, for a dry run of the script itself:
#   DEVICE=cpu SIZE=32 BATCHES="8 4" CONFIG=tiny WORKERS=0 FUSED= PEAK_TFLOPS=1 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-256}
BATCHES=${BATCHES:-"512 384 256 128"}
CONFIG=${CONFIG:-pretrain/gmml_vit_s16}
WORKERS=${WORKERS:-8}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
FUSED=${FUSED---fused-attn}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-5}

common=(-c "$CONFIG" --device "$DEVICE" --size "$SIZE" --workers "$WORKERS" --amp bf16
        --peak-tflops "$PEAK_TFLOPS" --steps "$STEPS" --warmup "$WARMUP" $FUSED)
"$PYTHON" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

batch=""
for b in $BATCHES; do  # the largest batch whose GMML step fits in memory
    if "$PYTHON" benchmarks/bench_pretrain.py "${common[@]}" --batch "$b" --steps 1 --warmup 1 \
        --only pretrain --augment-on step >/dev/null 2>&1; then
        batch=$b
        break
    fi
    echo "batch $b: does not fit (or failed); trying the next"
done
if [ -z "$batch" ]; then
    echo "no batch of ($BATCHES) ran; rerun one by hand to see why:" >&2
    echo "  $PYTHON benchmarks/bench_pretrain.py ${common[*]} --batch 64 --only pretrain" >&2
    exit 1
fi
echo "== batch $batch"
echo "== 1. bare timm step, GMML step (augment_on=step), loader alone"
"$PYTHON" benchmarks/bench_pretrain.py "${common[@]}" --batch "$batch" --augment-on step
echo "== 2. GMML step under torch.compile (augment_on=step), bare step beside it"
"$PYTHON" benchmarks/bench_pretrain.py "${common[@]}" --batch "$batch" --augment-on step --compile \
    --only pretrain
echo "== 3. GMML step with augmentation + corruption in $WORKERS loader workers (augment_on=loader)"
"$PYTHON" benchmarks/bench_pretrain.py "${common[@]}" --batch "$batch" --augment-on loader --only pretrain
echo "== 4. the step's batched augmentation + corruption"
"$PYTHON" benchmarks/bench_gmml_pipeline.py --size "$SIZE" --batch "$batch" --n "$((2 * batch))" \
    --device "$DEVICE" --device cpu
