#!/usr/bin/env bash
# GPU checks in one short run (a few minutes on one GPU): AMP training steps, torch.compile, the sliding
# window stitched on the device, and a 512x512x300 CT end to end. One JSON line per check on stdout (and in
# $OUT/gpu_check.jsonl when OUT is set). Without a GPU, or with --small, it runs tiny sizes on the CPU,
# which checks the script's logic only (its numbers say nothing about a GPU).
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --small    # logic check on a CPU (tiny sizes; no GPU figures)
# Needs medseg's dependencies in $PYTHON (default python), e.g. after scripts/setup.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
args=("$@")
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device: running the CPU-checkable parts at tiny sizes (no GPU figures)" >&2
  args=(--small --skip-compile "${args[@]}")
fi
if [[ -n "${OUT:-}" ]]; then args+=(--out "$OUT"); fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" bench/gpu_check.py "${args[@]}"
