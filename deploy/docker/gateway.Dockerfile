# syntax=docker/dockerfile:1.7
# The public gateway: no model, no torch, no GPU. Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t nextgpt-gateway .
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY deploy/docker/requirements-gateway.txt /tmp/requirements-gateway.txt
RUN pip install -r /tmp/requirements-gateway.txt
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY services ./services
RUN pip install --no-deps . && rm -rf /app/build

# The bundle is mounted read-only at /bundle (the gateway reads its manifest and tokenizer only).
RUN useradd --system --uid 10001 --home-dir /home/nextgpt --create-home nextgpt
USER 10001
ENV NEXTGPT_HOST=0.0.0.0 NEXTGPT_PORT=8000 NEXTGPT_BUNDLE=/bundle NEXTGPT_CACHE_DIR=/home/nextgpt/.cache
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["nextgpt", "health", "--url", "http://127.0.0.1:8000/healthz"]
CMD ["nextgpt", "gateway", "serve"]
