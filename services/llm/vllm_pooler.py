"""Hidden-state sidecar, run with vLLM's own Python: ``python -m services.llm.vllm_pooler --model DIR ...``.

vLLM's generate path returns no hidden states; its pooling runner does (task ``token_embed`` without
activation: the last layer after the final norm). Its HTTP ``/pooling`` route takes no ``prompt_embeds`` for
completion-style input, so this small server drives vLLM's offline pooling engine directly with prompt embeddings
(+ LoRA): a teacher-forced prefill over the prompt and the generated tokens.

The prompt's embeddings arrive once per reply (kept by key, least recently used dropped); each group then sends
only the generated token ids, embedded here from the model's own table. Concurrent callers are batched into one
engine call.

It runs in vLLM's environment: it imports vLLM, torch, safetensors and FastAPI, and of this project only
``services.llm.embedding_table`` (torch and safetensors alone).
"""

from __future__ import annotations

import argparse
import base64
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors


class StatesRequest(BaseModel):
    # The prompt's embeddings travel once per reply: base64 safetensors, tensor "tensor" (L, hidden), sent with the
    # reply's first group; later groups send only ``prompt_key`` (the client's digest of them).
    prompt: str | None = None
    prompt_key: str
    token_ids: list[int] = []  # the generated tokens after the prompt (embedded here from the model's own table)
    positions: list[int]
    lora: str | None = None


class PromptCache:
    """Prompt embeddings by key, least recently used dropped beyond ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            if key in self._items or size > self.max_bytes:
                return
            self._items[key] = tensor
            self.used += size
            while self.used > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.used -= dropped.numel() * dropped.element_size()


@dataclass
class _Job:
    embeds: torch.Tensor
    lora: str | None
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


class Batcher:
    """Concurrent callers' prefills go to the engine together: one ``encode`` call over every job waiting (up to
    ``max_batch``), which vLLM schedules as one batch, instead of one call at a time behind a lock."""

    def __init__(self, llm, loras: dict[str, object], max_batch: int = 32, wait_s: float = 0.002) -> None:  # type: ignore[no-untyped-def]
        self.llm, self.loras, self.max_batch, self.wait_s = llm, loras, max_batch, wait_s
        self._queue: queue.Queue[_Job] = queue.Queue()
        threading.Thread(target=self._loop, name="pooler-batcher", daemon=True).start()

    def run(self, embeds: torch.Tensor, lora: str | None) -> torch.Tensor:
        job = _Job(embeds, lora)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _loop(self) -> None:
        while True:
            jobs = [self._queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                outputs = self.llm.encode([{"prompt_embeds": j.embeds} for j in jobs], pooling_task="token_embed",
                                          lora_request=[self.loras.get(j.lora) if j.lora else None for j in jobs],
                                          use_tqdm=False)
                for job, out in zip(jobs, outputs, strict=True):
                    job.result = torch.as_tensor(out.outputs.data)
            except BaseException as exc:  # every caller of the batch gets it
                for job in jobs:
                    job.error = exc
            for job in jobs:
                job.done.set()


def build_app(llm, loras: dict[str, str], table: torch.Tensor, cache_bytes: int = 512 << 20):  # type: ignore[no-untyped-def]
    from fastapi import FastAPI, HTTPException
    from vllm.lora.request import LoRARequest

    requests = {name: LoRARequest(name, index + 1, path) for index, (name, path) in enumerate(loras.items())}
    batcher = Batcher(llm, requests)
    prompts = PromptCache(cache_bytes)
    app = FastAPI(title="nextgpt vllm pooler")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/states")
    def states(body: StatesRequest) -> dict[str, str]:
        if body.lora is not None and body.lora not in requests:
            raise HTTPException(400, f"unknown LoRA {body.lora!r}")
        if body.prompt is not None:
            prompt = load_tensors(base64.b64decode(body.prompt))["tensor"]
            prompts.put(body.prompt_key, prompt)
        else:
            prompt = prompts.get(body.prompt_key)
            if prompt is None:  # evicted, or another replica: the client sends the prompt again
                raise HTTPException(409, "unknown prompt_key: send the prompt")
        if any(t < 0 or t >= table.shape[0] for t in body.token_ids):
            raise HTTPException(400, "token id outside the vocabulary")
        embeds = torch.cat([prompt, table[body.token_ids].to(prompt.dtype)]) if body.token_ids else prompt
        if any(p < 0 or p >= embeds.shape[0] for p in body.positions):
            raise HTTPException(400, "positions outside the sequence")
        rows = batcher.run(embeds, body.lora)[body.positions].float().contiguous()
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
    parser.add_argument("--prompt-cache-mb", type=int, default=512, help="Prompt embeddings kept between groups")
    parser.add_argument("--architecture", default=None,
                        help="Model class registered by a vLLM plugin (services.llm.vllm_plugin)")
    args = parser.parse_args()

    # The engine runs in this process (an operator's own value of the variable wins): only the batcher thread
    # calls it, and an engine-core process of its own cost a second vLLM import and its memory (to /health on 2 CPU
    # cores, tiny bundle: 49-55 s against 27-29 s in-process, 2026-12-07). Read by vLLM, so set before its import.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
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
    from services.llm.embedding_table import load_embedding_table

    table = load_embedding_table(Path(args.model))
    uvicorn.run(build_app(llm, loras, table, args.prompt_cache_mb << 20), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
