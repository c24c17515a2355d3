#!/usr/bin/env bash
# GPU check (<= 8 minutes) for a machine with one NVIDIA GPU and no internet: PyTorch, Triton and
# ONNX Runtime present; mamba-ssm and TensorRT optional. Prints a table; writes $OUT/gpu_check.json.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# No network: install evim3 itself only; its dependencies must already be there.
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 480 python scripts/gpu_check.py
