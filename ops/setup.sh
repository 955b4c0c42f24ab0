#!/usr/bin/env bash
# Idempotent set-up of a machine for the fleet: system packages, .venv, the project with all
# extras. Fast when already done (a stamp of pyproject.toml and this script).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so' || need+=(libusb-1.0-0)
# MuJoCo renders offscreen through EGL (Mesa on a machine without a GPU).
ldconfig -p 2>/dev/null | grep -q 'libEGL_mesa.so' || need+=(libegl1 libegl-mesa0 libgl1-mesa-dri)
# The dashboard's browser tests drive Debian's Chromium (never a downloaded browser).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${need[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.fleetlearn-setup
want="$(cat pyproject.toml ops/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU build this lab machine has on disk; pyproject accepts a range so a GPU machine
  # keeps its own CUDA build.
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
  .venv/bin/python -m pip install -q -e ".[all]"
  echo "$want" >"$stamp"
fi
