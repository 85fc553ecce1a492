#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a GPU machine that has no network: run this where the
# package registry is reachable, then copy or carry ./wheels with the checkout.
#
#   bash scripts/gpu_wheels.sh [DIR]          # default ./wheels (ignored by git)
#
# A GPU machine's image usually brings torch, torchvision, pytorch-lightning, torchmetrics, numpy,
# matplotlib, rich and pytest, at its own versions; the project's code runs on those. What such an
# image lacks is the configuration stack (hydra-core, omegaconf and the antlr4 runtime that omegaconf's
# grammar needs), and its timm may be older than the one whose models and attention the reducers wrap.
# So this downloads exactly those, at the versions constraints.txt pins, as pure-Python wheels (any
# Python 3, any platform). antlr4-python3-runtime 4.9.3 is published as source only: it is built into a
# wheel here, which needs no compiler (pure Python).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/wheels}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
PACKAGES=(hydra-core omegaconf antlr4-python3-runtime timm)

pins=()
for p in "${PACKAGES[@]}"; do
    line=$(grep -i -E "^${p//-/[-_]}==" "$ROOT/constraints.txt" || true)
    if [ -z "$line" ]; then
        echo "constraints.txt pins no version of $p; expected a line '$p==VERSION'" >&2
        exit 2
    fi
    pins+=("$line")
done

mkdir -p "$DIR"
# Only these wheels: the GPU machine's own packages satisfy their other requirements (PyYAML,
# packaging, torch, torchvision, huggingface_hub, safetensors), and gpu_check.sh installs with --no-deps.
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" "${pins[@]}"
echo "wheels for the GPU machine in $DIR:"
ls -1 "$DIR"
