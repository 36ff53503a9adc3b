#!/usr/bin/env bash
# Set up, then run the whole test suite (tests that need ../shared/data skip with a reason where it is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[[ -n "${VIRTUAL_ENV:-}" ]] || source .venv/bin/activate
python -m pytest "$@"
