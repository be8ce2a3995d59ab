#!/usr/bin/env bash
# The seeds' comparison on the bundled demo data (1,000 Fashion-MNIST images) at 128 px, the
# size `headstart demo` uses:
#   1. scratch CNN (the VGG16 fine-tuning article's convnet, Flatten + Dropout 0.5), no augmentation
#   2. the same scratch CNN with augmentation (flip, rotation, zoom)
#   3. transfer learning: frozen EfficientNet-Lite0 (ImageNet) + a new head, no fine-tuning
#   4. transfer learning + fine-tuning of the backbone's top block (headstart's default)
# then `headstart compare` of the four: table (compare.md) and validation curves (compare.png).
# The scratch CNN starts with BatchNormalization: with batches of 8 (88 steps an epoch) its
# moving statistics settle within a few epochs; with the default 32 (22 steps) its validation
# accuracy stayed near chance for 6 epochs, early stopping ended the run, test accuracy 0.16.
#
#   bench/seed_comparison.sh [OUT]        # OUT defaults to runs/seed_comparison; 8 min, 2 cores
#
# The README's figure is OUT/compare.png, copied to docs/seed_comparison.png.
set -euo pipefail
OUT=${1:-runs/seed_comparison}
DATA=$(python -c "from headstart.training.demo import demo_data_path; print(demo_data_path())")
SIZE=128
SCRATCH=(--backbone scratch_cnn --mode frozen --head flatten --dropout 0.5 --batch-size 8 --epochs 30 --patience 5)

if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    echo "$OUT exists and is not empty: give another folder" >&2
    exit 2
fi
headstart --quiet train "$DATA" --out "$OUT/scratch" --image-size "$SIZE" "${SCRATCH[@]}" --augment none
headstart --quiet train "$DATA" --out "$OUT/scratch_augmented" --image-size "$SIZE" "${SCRATCH[@]}"
headstart --quiet train "$DATA" --out "$OUT/transfer" --image-size "$SIZE" --no-fine-tune
headstart --quiet train "$DATA" --out "$OUT/fine_tuned" --image-size "$SIZE"
headstart compare "$OUT/scratch" "$OUT/scratch_augmented" "$OUT/transfer" "$OUT/fine_tuned" \
    --out "$OUT"
