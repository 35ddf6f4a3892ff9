"""Hidden-state sidecar, run with vLLM's own Python: ``python -m services.llm.vllm_pooler --model DIR ...``.

vLLM's generate path returns no hidden states; its pooling runner does (task ``token_embed`` without
activation: the last layer after the final norm). Its HTTP ``/pooling`` route takes no ``prompt_embeds`` for
completion-style input, so this small server drives vLLM's offline pooling engine directly with prompt embeddings
(+ LoRA): a teacher-forced prefill over the prompt and the generated tokens.

Self-contained on purpose: it imports only vLLM, torch, safetensors and FastAPI (all in vLLM's environment), no
other module of this project.
"""

from __future__ import annotations

import argparse
import base64
import threading

import torch
from pydantic import BaseModel
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors


class StatesRequest(BaseModel):
    embeds: str  # base64 safetensors, tensor "tensor" (L, hidden)
    positions: list[int]
    lora: str | None = None


def build_app(llm, loras: dict[str, str]):  # type: ignore[no-untyped-def]
    from fastapi import FastAPI, HTTPException
    from vllm.lora.request import LoRARequest

    lock = threading.Lock()
    requests = {name: LoRARequest(name, index + 1, path) for index, (name, path) in enumerate(loras.items())}
    app = FastAPI(title="nextgpt vllm pooler")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/states")
    def states(body: StatesRequest) -> dict[str, str]:
        embeds = load_tensors(base64.b64decode(body.embeds))["tensor"]
        if body.lora is not None and body.lora not in requests:
            raise HTTPException(400, f"unknown LoRA {body.lora!r}")
        if any(p < 0 or p >= embeds.shape[0] for p in body.positions):
            raise HTTPException(400, "positions outside the sequence")
        with lock:
            out = llm.encode([{"prompt_embeds": embeds}], pooling_task="token_embed",
                             lora_request=requests.get(body.lora) if body.lora else None, use_tqdm=False)
        data = out[0].outputs.data
        rows = torch.as_tensor(data)[body.positions].float().contiguous()
        return {"states": base64.b64encode(save_tensors({"tensor": rows})).decode()}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--lora", action="append", default=[], help="name=path")
    parser.add_argument("--max-lora-rank", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    # Beside the OpenAI server on the same GPU, both engines must share it (e.g. 0.45 each).
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--architecture", default=None,
                        help="Model class registered by a vLLM plugin (services.llm.vllm_plugin)")
    args = parser.parse_args()

    import uvicorn
    from vllm import LLM
    from vllm.config import PoolerConfig

    loras = dict(item.split("=", 1) for item in args.lora)
    extra: dict[str, object] = {}
    if args.gpu_memory_utilization is not None:
        extra["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.architecture is not None:
        extra["hf_overrides"] = {"architectures": [args.architecture]}
    llm = LLM(model=args.model, runner="pooling",
              pooler_config=PoolerConfig(task="token_embed", use_activation=False),
              enable_lora=bool(loras), max_lora_rank=args.max_lora_rank, enable_prompt_embeds=True,
              dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=True, **extra)
    uvicorn.run(build_app(llm, loras), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
