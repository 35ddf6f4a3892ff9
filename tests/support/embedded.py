"""Settings for an embedded stack whose test is about the gateway, not the engines' processes."""

from __future__ import annotations

from services.contracts.settings import Settings


def engines_here(settings: Settings) -> Settings:
    """``settings`` with the LLM engine and the decoder pipelines in this process. Their own processes (the
    default, which `nextgpt serve`, the gateway's main test modules and the world e2e run) take about 8 s more to
    start and stop, each spawned child importing the model libraries again: a test of the HTTP schema, the
    playground or one gateway bound has no need of them."""
    return settings.model_copy(update={
        "llm": settings.llm.model_copy(update={"engine_process": False}),
        "decoders": settings.decoders.model_copy(update={"engine_process": False})})
