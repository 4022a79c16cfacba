#!/usr/bin/env bash
# Train the published scene detectors and segmenters (issue 16): StatAssist + GradBoost QAT on
# fashion_scenes at 128x128, resumably: rerun the script after an interruption and each run
# continues from its last checkpoint (a finished run only repeats its final evaluation and export).
#
#   RUNS=/root/frostnet-runs/dense MODELS="ssdlite_frostnet_small_1_0 tiny_dsod" \
#     nohup nice -n 19 bash tools/train_dense_zoo.sh >> /root/frostnet-runs/dense/a.log 2>&1 &
#
# Two runs side by side at one thread each on this 2-core machine (MODELS=... for each).
# The FrostNet-backboned models start their backbone from the published Fashion-MNIST classifier
# (--init, FP32 file; INIT_DIR says where the weights files are, default weights/); the others
# start from scratch. The schedule (10 epochs of 20000 canvases, 5 of them float, batch 32) fits
# the issue's budget of about 3 hours of one core per model with channels-last training.
# Learning rate: 0.1 for both tasks, from a probe on the training canvases only (one float epoch
# on 6000 canvases, batch 32, evaluated on 500 validation canvases; ssdlite_mobilenet_v2 at
# 0.01 / 0.04 / 0.1: val mAP@.5 0.002 / 0.026 / 0.25; lraspp_mobilenet_v3_large_re at
# 0.007 / 0.03 / 0.1: val mIoU 0.16 / 0.30 / 0.39). The papers' values (SSD 1e-2, segmentation
# 7e-3) fine-tune from ImageNet backbones over far longer schedules.
#
# Then publish each run into weights/ + the manifest:
#   python tools/add_weights.py $RUNS/<model>/export --default
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
MODELS=${MODELS:-"ssdlite_frostnet_small_1_0 lraspp_frostnet_small_1_0 ssdlite_mobilenet_v2 lraspp_mobilenet_v3_large_re tiny_dsod espnet"}
THREADS=${THREADS:-1}
INIT_DIR=${INIT_DIR:-weights}
EXTRA=${EXTRA:-}
for model in $MODELS; do
  case "$model" in
    ssdlite_*|tiny_dsod) task_flags=(--opt sgd --nesterov --lr 0.1 --sched cosine) ;;
    lraspp_*|espnet*) task_flags=(--opt sgd --lr 0.1 --sched poly) ;;
    *) echo "train_dense_zoo.sh: $model is not one of the scene models of issue 16" >&2; exit 2 ;;
  esac
  init_flags=()
  case "$model" in
    *_frostnet_small_1_0) init_flags=(--init "$INIT_DIR/frostnet_small_1_0.fashion_mnist.fp32.safetensors") ;;
  esac
  # shellcheck disable=SC2086  # EXTRA holds several flags
  python tools/train.py --model "$model" --data fashion_scenes --input-size 128 --mode statassist+gradboost \
    --epochs 10 --fp-epochs 5 --batch-size 32 "${task_flags[@]}" "${init_flags[@]}" --clip-grad 5 \
    --ema-decay 0.999 --output-dir "$RUNS/$model" --resume auto --ckpt-interval-steps 50 --no-progress \
    --threads "$THREADS" $EXTRA
done
