#!/usr/bin/env bash
# The README's quick start in one command on a fresh machine: the environment (make_env.sh),
# training on the shipped sample of 32 FITS pairs, then the Test script on its 8 test pairs
# with their metrics. The commands are the README's (README "Quick start"). PyTorch 2.13, with
# which the README's figures were measured, unless TORCH_REQUIREMENT names another.
set -euo pipefail
cd "$(dirname "$0")"
. ./make_env.sh requirements.txt "${TORCH_REQUIREMENT:-torch==2.13.0}"
if [ -e checkpoints/EUV2Mag_sample/Model/2560_G.pt ]; then
  echo "checkpoints/EUV2Mag_sample already holds the trained model (step 2560): not trained again"
else
python pix2pixCC_Train.py --dataset_name EUV2Mag_sample \
  --data_format_input fits --data_format_target fits \
  --input_dir_train datasets/Sample/Train/Input --target_dir_train datasets/Sample/Train/Target \
  --logscale_input True --saturation_lower_limit_input 1 --saturation_upper_limit_input 200 \
  --saturation_lower_limit_target -3000 --saturation_upper_limit_target 3000 \
  --n_gf 32 --n_df 32 --n_downsample 2 --n_residual 4 --n_CC 3 \
  --n_epochs 40 --n_epochs_decay 40 --save_freq 640 --report_freq 320 --display_freq 320 \
  --seed 1
fi
python pix2pixCC_Test.py --dataset_name EUV2Mag_sample --iteration 2560 \
  --input_dir_test datasets/Sample/Test/Input --target_dir_test datasets/Sample/Test/Target
echo "the generated magnetograms, their metrics (metrics.csv) and test_run.json are in" \
  "checkpoints/EUV2Mag_sample/Image/Test/2560/; the checkpoints in" \
  "checkpoints/EUV2Mag_sample/Model/, the loss log and curve in checkpoints/EUV2Mag_sample/"
echo "to use this environment in your shell: . .venv/bin/activate"
