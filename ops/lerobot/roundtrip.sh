#!/usr/bin/env bash
# LeRobot round trip for a `fleet export --format lerobot` dataset: builds LeRobot's own venv
# (LeRobot 0.6 needs Python >= 3.12 and torch < 2.12, so it cannot share the project's venv),
# loads the dataset with LeRobot's LeRobotDataset, checks it against the store's numbers, and
# trains ACT on it for a few steps with lerobot-train.
#
#   ops/lerobot/roundtrip.sh DATASET_DIR [VENV_DIR]      (--help for this text)
#
# Needs python3.12 (or PYTHON=/path/to/python>=3.12) and network access to PyPI the first
# time; the venv is reused afterwards (default var/lerobot-venv). VIDEO_BACKEND=torchcodec
# decodes with LeRobot's default where FFmpeg's shared libraries are installed (default pyav).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" || $# -lt 1 ]]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit $(( $# < 1 ? 2 : 0 ))
fi
here="$(cd "$(dirname "$0")" && pwd)"
dataset="$(cd "$1" && pwd)"
venv="${2:-var/lerobot-venv}"
python="${PYTHON:-python3.12}"
lerobot_version="${LEROBOT_VERSION:-0.6.1}"

if ! command -v "$python" >/dev/null; then
  echo "roundtrip: $python not found; LeRobot $lerobot_version needs Python >= 3.12 (set PYTHON=)" >&2
  exit 1
fi
# The bare `lerobot` wheel has neither LeRobotDataset's readers (datasets, torchcodec, av) nor
# lerobot-train's (accelerate, wandb): its `training` extra brings both. A stamp names what the
# venv holds, so a venv built without the extra (or for another version) is completed.
stamp="$venv/.fleet-lerobot-$lerobot_version-training"
if [[ ! -f "$stamp" ]]; then
  echo "roundtrip: building $venv with $python (lerobot[training]==$lerobot_version, torch<2.12)"
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "lerobot[training]==$lerobot_version" "torch<2.12"
  touch "$stamp"
fi

# torchcodec, LeRobot's default video decoder, needs FFmpeg's shared libraries on the system;
# PyAV (LeRobot's other backend) brings its own, so it decodes anywhere.
backend="${VIDEO_BACKEND:-pyav}"
echo "roundtrip: loading $dataset with LeRobotDataset (lerobot $lerobot_version, $backend)"
"$venv/bin/python" "$here/check_dataset.py" --video-backend "$backend" "$dataset"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# ACT takes the state and the colour cameras (its ResNet wants 3 channels; depth maps have
# one), and starts its backbone from scratch: ImageNet weights would be a download from
# outside PyPI, and 3 steps check that the dataset trains, not how well.
inputs="$("$venv/bin/python" "$here/act_features.py" "$dataset")"
echo "roundtrip: training ACT for 3 steps on $inputs (output in $out)"
"$venv/bin/lerobot-train" \
  --dataset.repo_id=local/fleet-export \
  --dataset.root="$dataset" \
  --dataset.video_backend="$backend" \
  --policy.type=act \
  --policy.push_to_hub=false \
  --policy.device=cpu \
  --policy.pretrained_backbone_weights=null \
  --policy.input_features="$inputs" \
  --num_workers=0 \
  --batch_size=2 \
  --steps=3 \
  --log_freq=1 \
  --save_checkpoint=false \
  --wandb.enable=false \
  --output_dir="$out/train"
echo "roundtrip: ok"
