"""In-process ``LLMClient`` (embedded mode)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from services.contracts.llm import GenerateParams, LLMClient, LLMEvent
from services.llm.serving import LLMService


class InProcessLLMClient(LLMClient):
    def __init__(self, service: LLMService) -> None:
        self.service = service

    def generate(self, params: GenerateParams, media: np.ndarray | None) -> AsyncIterator[LLMEvent]:
        return self.service.generate(params, media)

    async def check_ready(self) -> None:
        self.service.check_ready()
