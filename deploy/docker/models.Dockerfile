# syntax=docker/dockerfile:1.7
# The model roles, one target each. CUDA torch by default (the NVIDIA container toolkit provides the driver);
# the compose "cpu" profile builds the same file with TORCH_INDEX=https://download.pytorch.org/whl/cpu.
#   docker build -f deploy/docker/models.Dockerfile --target encoder -t nextgpt-encoder .
#   docker build -f deploy/docker/models.Dockerfile --target decoder -t nextgpt-decoder .
#   docker build -f deploy/docker/models.Dockerfile --target llm     -t nextgpt-llm .
# The model bundle is never baked in: mount it read-only at /bundle.
FROM python:3.11.14-slim-bookworm AS base

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# torch first, from the chosen index, so the package's own pin (torch==2.13.0) is already met.
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY services ./services
# imagebind-unofficial's metadata pulls CUDA torchvision/torchaudio that the model code never imports.
RUN pip install . \
 && pip install --no-deps imagebind-unofficial==0.1.1 \
 && rm -rf /app/build
RUN useradd --system --uid 10001 --home-dir /home/nextgpt --create-home nextgpt \
 && mkdir /bundle /bundles && chown 10001 /bundle /bundles
USER 10001
ENV NEXTGPT_HOST=0.0.0.0 NEXTGPT_BUNDLE=/bundle NEXTGPT_CACHE_DIR=/home/nextgpt/.cache \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

FROM base AS encoder
ENV NEXTGPT_ENCODER__DEVICE=cuda NEXTGPT_ENCODER__DTYPE=float16
EXPOSE 8001
# Long start period: ImageBind-huge loads for minutes from network storage.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["nextgpt", "health", "--url", "http://127.0.0.1:8001/healthz"]
CMD ["nextgpt", "encoder", "serve", "--port", "8001"]

FROM base AS decoder
ENV NEXTGPT_DECODERS__DEVICE=cuda
# A worker has no HTTP port: healthy while its broker answers.
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 CMD ["nextgpt", "health", "--redis"]
CMD ["nextgpt", "worker", "--queues", "image"]

FROM base AS llm
ENV NEXTGPT_LLM__DEVICE=cuda NEXTGPT_LLM__DTYPE=float16
EXPOSE 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["nextgpt", "health", "--url", "http://127.0.0.1:8002/healthz"]
CMD ["nextgpt", "llm", "serve", "--port", "8002"]
