#!/usr/bin/env bash
# Set up (idempotently) and run the main job: the offline demo (BVG-LS against full, partial and
# linear finetuning of a Fashion-MNIST-pretrained ResNet on two few-shot tasks), offline.
# Extra arguments go to `bvgls demo` (e.g. --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cli
exec ${PYTHON:-python3} -m bvgls demo "$@"
