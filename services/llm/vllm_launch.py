"""Command lines of the two vLLM processes a bundle needs: the OpenAI server (generation with prompt
embeddings and LoRA) and the hidden-state pooler. Used by tests, and printed by ``nextgpt llm vllm-commands``
for deployments."""

from __future__ import annotations

from services.bundle.loader import Bundle

# vLLM's CPU platform needs eager mode here (its compile cache never loads, see vllm-cpu-facts).
_COMMON = ["--enforce-eager"]


def server_args(python: str, bundle: Bundle, port: int, dtype: str = "float32", host: str = "127.0.0.1",
                max_num_seqs: int | None = None) -> list[str]:
    """``max_num_seqs``: vllm-cpu 0.32 crashes its engine when it batches several ``prompt_embeds`` requests on
    a LoRA-enabled server (punica CPU ``bgmv_expand``: "einsum(): subscript b has size ..."), with or without an
    adapter in the request; 1 keeps such a server alive on CPU at the cost of batching. GPU: leave it None."""
    m = bundle.manifest
    args = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(bundle.path(m.llm.path)),
            "--served-model-name", m.name, "--host", host, "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(m.llm.max_model_len), "--enable-prompt-embeds", *_COMMON]
    if m.llm.loras:
        args += ["--enable-lora", "--max-lora-rank", str(max(lora.rank for lora in m.llm.loras)),
                 "--lora-modules", *[f"{lora.name}={bundle.path(lora.path)}" for lora in m.llm.loras]]
    if max_num_seqs is not None:
        args += ["--max-num-seqs", str(max_num_seqs)]
    return args


def cpu_safe_max_num_seqs(bundle: Bundle) -> int | None:
    return 1 if bundle.manifest.llm.loras else None


def pooler_args(python: str, bundle: Bundle, port: int, dtype: str = "float32", host: str = "127.0.0.1") -> list[str]:
    m = bundle.manifest
    args = [python, "-m", "services.llm.vllm_pooler", "--model", str(bundle.path(m.llm.path)), "--host", host,
            "--port", str(port), "--dtype", dtype, "--max-model-len", str(m.llm.max_model_len)]
    for lora in m.llm.loras:
        args += ["--lora", f"{lora.name}={bundle.path(lora.path)}"]
    if m.llm.loras:
        args += ["--max-lora-rank", str(max(lora.rank for lora in m.llm.loras))]
    return args


VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
