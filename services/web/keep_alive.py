"""How long idle HTTP connections are kept, by our servers and by our clients of them.

A client that reuses a pooled connection at the moment the server closes it for idleness gets a reset (ECONNRESET:
the request never arrived), which the gateway can only answer with a 503. The race is avoided only when every
server keeps an idle connection longer than its clients do: uvicorn's default (5 s) equalled httpx's pool expiry
(5 s) and was under aiohttp's (15 s), so a gateway whose LLM or encoder connection sat idle about 5 s failed that
request now and then (seen in CI: a second turn sent 5 s after the first got "llm is unreachable: Connection reset
by peer"). Public clients pool too (the OpenAI SDK's httpx pool, browsers), and load balancers idle out after 60 s
(AWS ALB's default), which a backend's keep-alive should outlast as well."""

from __future__ import annotations

SERVER_IDLE_S = 75  # every server of ours: gateway, encoder, LLM service
CLIENT_IDLE_S = 30.0  # the gateway's clients of the encoder and LLM services: well under SERVER_IDLE_S
# The LLM service's client of vLLM, whose server closes idle connections after VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s
# by default): a server we do not run, so its clients let go well before its default.
VLLM_CLIENT_IDLE_S = 2.0
