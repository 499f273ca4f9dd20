#!/usr/bin/env bash
# Idempotent set-up for a fresh machine, per command: system data packages, PyTorch, bvgls with the
# extras that command needs, and the lab beside it (lab/: the experiments, the demo, the pretrained set-up).
# Usage: bash scripts/setup.sh [cli|test]   (default cli: the main job, `bvgls-lab demo`; test: the test suite)
# Safe to run again: every step checks first and does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# what each extra set installs, and the modules that show it is installed
case "${1:-cli}" in
  cli)  extras="cli";  modules="bvgls, bvgls_lab, torchvision, typer, rich, tqdm, matplotlib, sklearn, timm, safetensors" ;;
  test) extras="test"; modules="bvgls, bvgls_lab, torchvision, typer, rich, tqdm, matplotlib, sklearn, safetensors, pytest, timm, transformers, accelerate, lightning, tensorboard, schedulefree, prodigyopt, ruff" ;;
  *) echo "setup: error: unknown extra set '$1' (expected cli or test)" >&2; exit 2 ;;
esac

# Offline data used by the benchmark, the demo and the tests (Debian packages): Fashion-MNIST and fonts.
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

# bvgls itself, editable, with this command's extras, then the lab (its dependencies are bvgls's cli
# extras, installed by either set); one marker per extra set, so installing the test extras does not
# count as having installed the CLI's, and a changed pyproject.toml reinstalls.
marker=".setup-done-$extras"
if ! $PY -c "import $modules" 2>/dev/null || [ ! -f "$marker" ] || [ pyproject.toml -nt "$marker" ] \
    || [ lab/pyproject.toml -nt "$marker" ]; then
  echo "setup: installing bvgls[$extras] and the lab (lab/)"
  $PY -m pip install -q -e ".[$extras]"
  $PY -m pip install -q -e lab/
  touch "$marker"
fi

# ImageNet-pretrained weights and the image tasks built from them (added by the pretrained set-up).
if [ -f scripts/setup_pretrained.sh ]; then
  bash scripts/setup_pretrained.sh
fi
