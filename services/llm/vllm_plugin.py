"""A vLLM plugin (entry point ``vllm.general_plugins``): our Llama architecture for vLLM, ``NextGPTLlamaForCausalLM``.

It is vLLM's Llama with one difference: no embedding modules for LoRA. vLLM wraps ``embed_tokens`` and
``lm_head`` in LoRA layers whenever a model declares them, whatever the adapters hold, and that wrapper indexes
token ids that ``prompt_embeds`` requests do not have: batching such requests on a LoRA-enabled server crashes the
engine (vllm#51121; on CPU: punica's ``bgmv_expand`` einsum). NExT-GPT's adapters touch only q/k/v/o, so the
embeddings need no wrapper, and the server can batch again. Servers select it with
``--hf-overrides '{"architectures": ["NextGPTLlamaForCausalLM"]}'`` (``services.llm.vllm_launch``).

vLLM runs plugins in every process it starts (API server, engine core, workers): registration is idempotent.
Imports only vLLM, like the pooler, so it runs in vLLM's own environment.
"""

from __future__ import annotations

ARCHITECTURE = "NextGPTLlamaForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "services.llm.vllm_model:NextGPTLlamaForCausalLM")
