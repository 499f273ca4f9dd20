#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system data packages, PyTorch, and bvgls with its extras.
# Usage: bash scripts/setup.sh            (safe to run again; does nothing that is already done)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Offline data used by the benchmark and demo (Debian packages): Fashion-MNIST and fonts.
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
for pkg in fonts-dejavu-core fonts-liberation fonts-freefont-ttf; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: warning: ${need[*]} missing and apt-get unavailable; offline tasks that need them will say so" >&2
  fi
fi

# PyTorch: the releases this project is tested with (the package itself declares a range).
if ! $PY -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')))" 2>/dev/null; then
  echo "setup: installing torch 2.14.1 and torchvision 0.29.1"
  $PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi

# bvgls itself, editable, with the extras the tests and the CLI use.
if ! $PY -c "import bvgls, typer, matplotlib, sklearn, timm, transformers, lightning, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .setup-done ]; then
  echo "setup: installing bvgls and its extras"
  $PY -m pip install -q -e ".[dev,hf,lightning,tensorboard]"
  touch .setup-done
fi
