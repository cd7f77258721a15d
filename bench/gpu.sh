#!/usr/bin/env bash
# The paper-scale comparison on one GPU: ResNet-18 on 49,000 CIFAR-10 training images (100 a class kept for
# tuning the peers), every method.
#
#   bash bench/gpu.sh [bench/forgetting.py options, which override the ones below]
#
# Needs, in the repository (both folders are git-ignored, so the device tool carries them by name):
#   .gpu_data/cifar10-jpg.tar.gz   a copy of ../shared/data/cifar10-jpg.tar.gz
#   .whl/                          wheels of hydra-core, omegaconf and antlr4-python3-runtime, used only where
#                                  they are not installed (the GPU image has torch, lightning, sklearn, not these)
# Writes results.md, results.json and stderr.log (progress bars, warnings) to $OUT (default bench/results/gpu);
# prints the GPU model and the progress.
#
# The original's recipe (also retraining's): batch 512, SGD with Nesterov momentum 0.9, weight decay 5e-4, a
# one-cycle learning rate peaking at 0.4 (the batch-512 setting of Page's "How to train your ResNet"
# DAWNBench runs: 94% in 24 epochs with a smaller ResNet; 0.1 at batch 128 linearly scaled), 20 epochs,
# bf16-mixed, channels_last, images kept on the GPU and augmented there. No label smoothing: it keeps about
# smoothing / classes (0.01 at 0.1) probability on every class, which is the forget-mass limit of the stop
# rule of `relevance`, and it blunts the entropy MIA.
# Seeds as time allows: a further seed starts only if the slowest so far would end within --budget-minutes.
# The published full-data regimes (ssd_full: per-sample gradients of all 50,000 images; salun_full: 10
# epochs) cost more than a retraining each: add them with --methods where the time is there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
data=${DATA:-/tmp/cifar10-jpg}

if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ ! -d "$data/train" ]; then
    mkdir -p "$data"
    tar -xzf .gpu_data/cifar10-jpg.tar.gz -C "$data"
fi
mkdir -p "$out"
python3 -c 'import torch; print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
status=0
python3 bench/forgetting.py --root "$data" --out "$out" \
    --arch resnet18 --train-per-class 4900 --test-per-class 0 \
    --epochs 20 --batch-size 512 --optimizer sgd --lr 0.4 --weight-decay 5e-4 --scheduler onecycle \
    --device cuda --precision bf16-mixed --channels-last --eval-batch-size 1024 \
    --seeds 0 1 2 --budget-minutes 6 --forget 1 0,8 --shots 10 \
    --methods relevance retrain head_only finetune delete ssd salun gradient_ascent random_label retrain_few \
    "$@" 2>"$out/stderr.log" || status=$?
[ "$status" -eq 0 ] || tail -n 40 "$out/stderr.log"
exit "$status"
