"""vLLM's Llama without LoRA embedding modules (see ``services.llm.vllm_plugin``): imported by vLLM only."""

from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM


class NextGPTLlamaForCausalLM(LlamaForCausalLM):
    # Nothing here for vLLM to wrap in LoRA layers: adapters on q/k/v/o (and the MLP) still apply.
    embedding_modules: dict[str, str] = {}
