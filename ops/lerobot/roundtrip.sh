#!/usr/bin/env bash
# LeRobot round trip for a `fleet export --format lerobot` dataset: builds LeRobot's own venv
# (LeRobot 0.6 needs Python >= 3.12 and torch < 2.12, so it cannot share the project's venv),
# loads the dataset with LeRobot's LeRobotDataset, checks it against the store's numbers, and
# trains ACT on it for a few steps with lerobot-train.
#
#   ops/lerobot/roundtrip.sh DATASET_DIR [VENV_DIR]      (--help for this text)
#
# Needs python3.12 (or PYTHON=/path/to/python>=3.12) and network access to PyPI the first
# time; the venv is reused afterwards (default var/lerobot-venv).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" || $# -lt 1 ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
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
if [[ ! -x "$venv/bin/python" ]]; then
  echo "roundtrip: building $venv with $python (lerobot==$lerobot_version, torch<2.12)"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "lerobot==$lerobot_version" "torch<2.12"
fi

echo "roundtrip: loading $dataset with LeRobotDataset"
"$venv/bin/python" "$here/check_dataset.py" "$dataset"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "roundtrip: training ACT for 3 steps (output in $out)"
"$venv/bin/lerobot-train" \
  --dataset.repo_id=local/fleet-export \
  --dataset.root="$dataset" \
  --policy.type=act \
  --policy.push_to_hub=false \
  --policy.device=cpu \
  --batch_size=2 \
  --steps=3 \
  --save_checkpoint=false \
  --wandb.enable=false \
  --output_dir="$out/train"
echo "roundtrip: ok"
