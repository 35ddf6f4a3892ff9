"""Command lines of the two vLLM processes a bundle needs: the OpenAI server (generation with prompt
embeddings and LoRA) and the hidden-state pooler. Used by tests, and printed by ``nextgpt llm vllm-commands``
for deployments."""

from __future__ import annotations

import json

from services.bundle.loader import Bundle
from services.llm.vllm_plugin import ARCHITECTURE

# vLLM's CPU platform needs eager mode here (its compile cache never loads, see vllm-cpu-facts).
_COMMON = ["--enforce-eager"]
# Our vLLM plugin's Llama (the project installed into vLLM's environment: `pip install --no-deps .`).
_ARCHITECTURE = ["--hf-overrides", json.dumps({"architectures": [ARCHITECTURE]})]


def server_args(python: str, bundle: Bundle, port: int, dtype: str = "float32", host: str = "127.0.0.1",
                max_num_seqs: int | None = None) -> list[str]:
    """The model runs as our vLLM plugin's architecture (``services.llm.vllm_plugin``: no LoRA wrapper around the
    embeddings, which crashed an engine batching ``prompt_embeds`` requests with LoRA enabled), so it batches;
    ``max_num_seqs`` bounds the batch (vLLM's default when None)."""
    m = bundle.manifest
    args = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(bundle.path(m.llm.path)),
            "--served-model-name", m.name, "--host", host, "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(m.llm.max_model_len), "--enable-prompt-embeds", *_COMMON, *_ARCHITECTURE]
    if m.llm.loras:
        args += ["--enable-lora", "--max-lora-rank", str(max(lora.rank for lora in m.llm.loras)),
                 "--lora-modules", *[f"{lora.name}={bundle.path(lora.path)}" for lora in m.llm.loras]]
    if max_num_seqs is not None:
        args += ["--max-num-seqs", str(max_num_seqs)]
    return args


def pooler_args(python: str, bundle: Bundle, port: int, dtype: str = "float32", host: str = "127.0.0.1") -> list[str]:
    m = bundle.manifest
    args = [python, "-m", "services.llm.vllm_pooler", "--model", str(bundle.path(m.llm.path)), "--host", host,
            "--port", str(port), "--dtype", dtype, "--max-model-len", str(m.llm.max_model_len),
            "--architecture", ARCHITECTURE]
    for lora in m.llm.loras:
        args += ["--lora", f"{lora.name}={bundle.path(lora.path)}"]
    if m.llm.loras:
        args += ["--max-lora-rank", str(max(lora.rank for lora in m.llm.loras))]
    return args


VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
