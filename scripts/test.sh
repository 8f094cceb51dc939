#!/usr/bin/env bash
# The test command (README, .ci/run): sets up if needed, checks generated stubs, runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/gen_protos.py --check
exec python -m pytest -q "$@"
