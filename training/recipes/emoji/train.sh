#!/usr/bin/env bash
# The embedded demo model, rebuilt from scratch with the project's own scripts: the emoji dataset, a small VQGAN
# tokenizer (train_vqgan.py), a small class-conditional MAGE (train_mage.py), then the evaluation for the model card
# (evaluate.py) and the shipped pipeline folder. Every command and seed is here; run from the repository root:
#
#     bash training/recipes/emoji/train.sh [WORK_DIR]      # default work dir: outputs/emoji-recipe
#
# On the 2-core CPU it was made on this takes about an hour (timings in training/recipes/emoji/README.md).
set -euo pipefail
PY=${PY:-.venv/bin/python}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}
WORK=${1:-outputs/emoji-recipe}
SEED=0
VQ_STEPS=${VQ_STEPS:-1500}
MAGE_STEPS=${MAGE_STEPS:-5000}
mkdir -p "$WORK"

# 1. Data: 3,781 Noto emoji (Apache-2.0) from the npm registry, 9 categories, 10% of the emoji held out with their
#    skin-tone variants.
"$PY" training/recipes/emoji/build_dataset.py --output "$WORK/data" --seed $SEED ${EMOJI_TARBALL:+--tarball "$EMOJI_TARBALL"}

# 2. Tokenizer: 32 px images -> 8x8 tokens from a 512-code codebook. No perceptual or adversarial loss (their weights
#    cannot be downloaded here). Codes unused for 40 steps are restarted: without that the codebook collapsed to one
#    code (mostly white background) within 100 steps.
"$PY" training/train_vqgan.py --dataset_name "$WORK/data" --resolution 32 --random_crop_scale 0.8 1 \
    --base_channels 48 --channel_multiplier 1 2 2 --num_res_blocks 1 --num_embeddings 512 --embed_dim 32 \
    --norm_num_groups 16 --reconstruction_loss l2 --perceptual_weight 0 --disc_weight 0 \
    --dead_code_steps 40 --usage_window 40 \
    --train_batch_size 32 --max_train_steps $VQ_STEPS --learning_rate 3e-4 --lr_scheduler cosine \
    --lr_warmup_steps $(( VQ_STEPS < 500 ? VQ_STEPS / 10 : 50 )) --num_validation_images 0 \
    --image_logging_steps 500 --checkpointing_steps 250 --checkpoints_total_limit 1 \
    --report_to none --seed $SEED --output_dir "$WORK/vq"

# 3. MAGE, class-conditional on the emoji category (10% of the labels dropped for classifier-free guidance), over
#    the tokens of 8 augmented views per image computed once.
cat > "$WORK/mage-config.json" <<'JSON'
{"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768,
 "decoder_hidden_size": 192, "decoder_num_hidden_layers": 2, "decoder_num_attention_heads": 3,
 "decoder_intermediate_size": 768, "num_classes": 9}
JSON
"$ACCELERATE" launch --num_processes 1 training/train_mage.py --dataset_name "$WORK/data" --class_column label \
    --config "$WORK/mage-config.json" --vq_model "$WORK/vq" --min_crop_scale 0.8 --precompute_tokens \
    --precompute_views 8 --train_batch_size 64 --max_train_steps $MAGE_STEPS --learning_rate 1e-3 \
    --lr_warmup_steps 250 --class_dropout_prob 0.1 --checkpointing_steps 1000 --checkpoints_total_limit 1 \
    --validation_steps 1000 --report_to none --seed $SEED --output_dir "$WORK/mage"

# 4. Evaluation for the model card, and the pipeline folder that is shipped in src/mage_hf/data/demo-model.
"$PY" training/recipes/emoji/evaluate.py --data "$WORK/data" --vq "$WORK/vq" --mage "$WORK/mage" \
    --output "$WORK/eval" --seed $SEED --probe_epochs ${PROBE_EPOCHS:-20}

# 5. Ship it as the package's embedded demo model (src/mage_hf/data/demo-model), which it replaces: only when asked
#    (SHIP=1, as `make demo-model` sets), so that a trial run leaves the shipped model alone.
if [ "${SHIP:-0}" = "1" ]; then
    "$PY" training/recipes/emoji/ship.py --pipeline "$WORK/eval/pipeline"
else
    echo "Not shipped (SHIP=1 replaces src/mage_hf/data/demo-model with $WORK/eval/pipeline)."
fi
