#!/usr/bin/env bash
# (c) of the throughput suite on one GPU, offline, in a few minutes: the engine's continuous
# batching against sequential model.generate on a SmolLM2-135M-shaped model built on the spot,
# and the decode rate as a fraction of the card's memory bandwidth.
#
#   bench/gpu.sh                 from the repository root, on a machine with CUDA and torch
#
# It uses the python3 that holds torch (PYTHON=... to pick another) and this checkout's sources.
# The engine calls the model with the keywords of the transformers release pinned in
# pyproject.toml; if that python has another release, put the pinned wheel beside it first
# (pip install transformers==<pinned> from a wheel you carry).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pinned=$(sed -n 's/.*"transformers==\([0-9.]*\)".*/\1/p' pyproject.toml)
have=$($PYTHON -c 'import transformers; print(transformers.__version__)')
if [ "$have" != "$pinned" ]; then
  echo "warning: transformers $have here, $pinned pinned; the engine may not run on it" >&2
fi
$PYTHON -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"'
PYTHONPATH=src:. timeout 480 $PYTHON -m bench.gpu --device cuda "$@"
