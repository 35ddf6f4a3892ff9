# syntax=docker/dockerfile:1.7
# The LLM's engine: the official vLLM image (same version as the package's "gpu" extra) plus our hidden-state
# pooler and our vLLM plugin (a Llama without LoRA embedding wrappers), which import only vLLM, torch, safetensors and
# FastAPI. Two containers run from this image: the
# OpenAI server (generation, prompt embeddings, LoRA) and the pooler; see `nextgpt llm vllm-commands`.
#   docker build -f deploy/docker/vllm.Dockerfile -t nextgpt-vllm .
FROM vllm/vllm-openai:v0.33.0

ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONPATH=/app
WORKDIR /app
COPY services/__init__.py services/__init__.py
COPY services/llm/__init__.py services/llm/__init__.py
COPY services/llm/vllm_pooler.py services/llm/vllm_pooler.py
COPY services/llm/embedding_table.py services/llm/embedding_table.py
COPY services/llm/vllm_plugin.py services/llm/vllm_plugin.py
COPY services/llm/vllm_model.py services/llm/vllm_model.py
# The plugin's entry point (vLLM loads it in every process): the project's metadata without its dependencies.
COPY pyproject.toml README.md ./
RUN pip install --no-cache-dir --no-deps -e .
RUN useradd --system --uid 10001 --home-dir /home/nextgpt --create-home nextgpt
USER 10001
ENV HOME=/home/nextgpt
EXPOSE 8100
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8100/health', timeout=4)"]
ENTRYPOINT []
CMD ["python3", "-m", "vllm.entrypoints.openai.api_server", "--help"]
