"""Typed settings, read once from the environment (prefix ``NEXTGPT_``, ``__`` for nested groups) and passed
down to whatever needs them. A bad value stops start-up with the name of the variable to fix."""

from __future__ import annotations

from pathlib import Path
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from services.contracts.errors import ConfigurationError

ENV_PREFIX = "NEXTGPT_"
ENV_NESTED_DELIMITER = "__"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "nextgpt"


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "s3"] = "local"
    local_dir: Path | None = Field(default=None, description="Folder of the local store (default: cache_dir/artifacts)")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; None means AWS")
    s3_bucket: str | None = Field(default=None, min_length=3, max_length=63)
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_prefix: str = Field(default="", pattern=r"^([A-Za-z0-9._-]+/)*$")
    s3_create_bucket: bool = Field(default=False, description="Create the bucket at start when it is missing")
    presign_ttl_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600,
                               description="Lifetime of the presigned URLs that redirect_downloads hands out")
    redirect_downloads: bool = Field(
        default=False, description="Artifact downloads answer 307 to a presigned URL of the S3 store (which "
                                   "clients must reach) instead of streaming the bytes through the gateway")
    max_object_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    conditioning_retention_s: int | None = Field(
        default=86400, ge=60, description="Decode conditionings are deleted after this (None: kept)")
    artifact_retention_s: int | None = Field(
        default=7 * 86400, ge=60, description="Generated media are deleted after this (None: kept)")
    sweep_every_s: int = Field(default=3600, ge=10, description="How often expired objects are swept")

    @model_validator(mode="after")
    def _s3_complete(self) -> StorageSettings:
        if self.redirect_downloads and self.backend != "s3":
            raise ValueError("NEXTGPT_STORAGE__REDIRECT_DOWNLOADS needs NEXTGPT_STORAGE__BACKEND=s3 (a local store "
                             "has no URL of its own)")
        if self.backend == "s3" and not self.s3_bucket:
            raise ValueError("NEXTGPT_STORAGE__S3_BUCKET is required when NEXTGPT_STORAGE__BACKEND is 's3'")
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError(
                "set both NEXTGPT_STORAGE__S3_ACCESS_KEY_ID and NEXTGPT_STORAGE__S3_SECRET_ACCESS_KEY, or neither"
            )
        return self


class RedisSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(default="redis://127.0.0.1:6379/0", pattern=r"^rediss?://")
    key_prefix: str = Field(default="nextgpt:", min_length=1)
    max_connections: int = Field(
        default=1024, ge=8, le=65536, description="Gateway's pool; each open stream holds ~2 in blocking reads")


class EncoderSettings(BaseModel):
    """The encoder service: where the model runs, how requests are batched, what one request may cost."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, description="Remote encoder service; None runs it in-process")
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_batch: int = Field(default=8, ge=1, le=256)
    max_wait_ms: float = Field(default=0.0, ge=0, le=1000,
                               description="Extra wait for a fuller batch; 0 batches only what queued meanwhile")
    max_queue: int = Field(default=256, ge=1)
    decode_workers: int = Field(default=2, ge=1, le=64)
    max_files: int = Field(default=8, ge=1, le=256)
    max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_audio_seconds: float = Field(default=600.0, gt=0)
    max_video_seconds: float = Field(default=600.0, gt=0)
    max_video_pixels: int = Field(default=4096 * 2160, ge=1)
    timeout_s: float = Field(default=120.0, gt=0, description="Client-side timeout of one encode call")

    @property
    def max_request_bytes(self) -> int:
        return self.max_files * self.max_file_bytes + 1024 * 1024


class DecoderSettings(BaseModel):
    """Decoder workers and the queue between them and the gateway."""

    model_config = ConfigDict(extra="forbid")

    device: str = "cpu"
    time_limit_s: float = Field(
        default=900.0, gt=0,
        description="A job running longer is failed between steps, and so is one whose steps so far show it would "
                    "(from its first step: one that would take twice as long; with engine_process, a step under way "
                    "is judged every second, and one past the limit is ended by killing the child)")
    visibility_timeout_s: int = Field(
        default=3600, ge=1,
        description="Celery hands a job taken by a worker that died out again after this (a job someone follows or "
                    "polls is queued again sooner: see lock_ttl_s)")
    max_retries: int = Field(default=3, ge=0, le=20, description="Retries, for transient storage errors only")
    lock_ttl_s: int = Field(
        default=120, ge=1,
        description="Lease on a running job, renewed every third of it; a running job without a lease that has "
                    "reported nothing for this long lost its worker, and the gateway queues it again")
    queue_wait_s: float = Field(
        default=600.0, gt=0, description="A job no worker has taken by then fails (no_decoder_worker / queue_timeout)")
    max_queued: int = Field(default=64, ge=1, description="Embedded pool: jobs waiting at most")
    max_batch: int = Field(default=8, ge=1, le=64,
                           description="Queued jobs of one modality, steps and size run as one call (embedded pool "
                                       "and Celery workers)")
    batch_wait_s: float = Field(
        default=0.05, gt=0, le=5.0,
        description="How long a job on an idle worker waits for batch-mates before it runs (embedded pool and "
                    "Celery workers; a job that already waited that long in the queue runs at once)")
    threads: int | None = Field(
        default=None, ge=1, le=1024,
        description="With engine_process on CPU: torch threads of the decoder process (None: torch's default, one "
                    "per core). A team with a thread per core slows 3-4x whenever another process keeps a core busy "
                    "(the LLM engine decoding replies, a neighbour): on 2 cores, 1 leaves the LLM its core")
    threads_beside_llm: int | None = Field(
        default=None, ge=0, le=1024,
        description="Embedded mode, with engine_process on CPU: the decoder process's torch threads while the LLM "
                    "has generations under way (and 0.1 s after), switched between steps. None: the cores the LLM "
                    "engine leaves (the decoder's threads less the engine's, at least 1; no switch where the LLM "
                    "runs elsewhere or OMP_NUM_THREADS sets both); 0: never switch")
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Celery workers: serve Prometheus /metrics on this port (None: none; embedded mode serves the "
                    "pool's on the server's /metrics)")
    metrics_host: str = Field(default="0.0.0.0", description="Celery workers: the address metrics_port listens on")
    engine_process: bool = Field(
        default=True, description="Embedded pool and Celery workers: the pipelines run in a child process (one "
                                  "OpenMP team: about 1.6x faster on CPU; a decoder crash fails its jobs, not the "
                                  "process; a step past the time limit, or a stop not taken within 10 s, is ended "
                                  "by killing the child)")
    # Measured on the world bundle on CPU (peak RSS of one decode, 1 step): a 256x256x16 clip +1.1 GiB, a 512x512
    # picture +0.4 GiB; attention makes the cost grow faster than the pixels. 2^21 keeps one decode within a
    # few GiB here; a GPU deployment of the real decoders (ZeroScope 576x320x24 = 4.4 M) raises it.
    max_pixels_per_job: int = Field(
        default=2**21, ge=64 * 64, description="Bound on height x width x frames of one image or video job")


class LLMSettings(BaseModel):
    """The LLM service: backend, bounds on one request, and how many may wait."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, description="Remote LLM service; None runs it in-process")
    backend: Literal["transformers", "vllm"] = "transformers"
    vllm_url: str | None = Field(default=None, description="vLLM OpenAI server (backend 'vllm')")
    vllm_pooler_url: str | None = Field(default=None, description="The hidden-state pooler (backend 'vllm')")
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_tokens: int = Field(default=1024, ge=1, le=32768, description="Upper bound on a request's max_tokens")
    max_prompt_tokens: int | None = Field(default=None, ge=1, description="Default: the bundle's max_model_len")
    max_media: int = Field(default=16, ge=0, le=256)
    max_batch: int = Field(default=16, ge=1, le=256, description="Replies decoded together (transformers backend)")
    engine_process: bool = Field(
        default=True, description="Transformers backend: decode in a child process, off the server's interpreter lock")
    threads: int | None = Field(
        default=None, ge=1, le=1024,
        description="Transformers backend on CPU: torch threads of its decoding. None: in the engine process, all of "
                    "torch's default but one (left to the server and whatever shares the machine: a step split over "
                    "every core waits for whichever core another process holds), or OMP_NUM_THREADS when set; in "
                    "the server's own process (engine_process false), torch's default")
    cpus: str | None = Field(
        default=None, pattern=r"^(auto|[0-9]{1,4}(-[0-9]{1,4})?(,[0-9]{1,4}(-[0-9]{1,4})?)*)$",
        description="Transformers backend's engine process on CPU: the CPUs it runs on, as a list ('1,3-5'; its "
                    "torch threads default to their number) or 'auto' (the last of the CPUs this server may use, as "
                    "many as the engine's threads: the first stay with the server). None: wherever the kernel puts "
                    "it. Bound, the kernel no longer moves its compute between cores: first token -14% through the "
                    "gateway at concurrency 1 on 2 cores; leave it unset where replicas share a machine's CPUs (each "
                    "would bind the same ones)")
    max_waiting: int = Field(default=32, ge=1, description="Generations waiting beyond the batch; 503 beyond")
    timeout_s: float = Field(default=600.0, gt=0, description="Client-side bound on one generation")
    accept_timeout_s: float = Field(
        default=30.0, gt=0, description="Gateway: the LLM service must answer a generation request (its status, "
                                        "sent once the request is checked and its prompt embedded, before it "
                                        "queues) within this; past it the turn is a 503 llm_unavailable (a service "
                                        "that holds connections but has stopped answering)")
    engine_stall_s: float = Field(
        default=300.0, gt=0, description="Engine process silent this long with generations under way: killed as "
                                         "hung (its replies fail with 503 and the server stops for a restart)")

    @model_validator(mode="after")
    def _vllm_urls(self) -> LLMSettings:
        if self.backend == "vllm" and not (self.vllm_url and self.vllm_pooler_url):
            raise ValueError("backend 'vllm' needs NEXTGPT_LLM__VLLM_URL and NEXTGPT_LLM__VLLM_POOLER_URL")
        return self

    @property
    def decodes_in_engine_process(self) -> bool:
        """Whether the service decodes in a child process of its own (the transformers backend's engine)."""
        return self.backend == "transformers" and self.engine_process

    @model_validator(mode="after")
    def _cpus_need_the_engine_process(self) -> LLMSettings:
        # Binding the server's own process would put its event loop on the decoding's cores.
        if self.cpus is not None and not self.decodes_in_engine_process:
            raise ValueError("NEXTGPT_LLM__CPUS binds the transformers backend's engine process: it needs "
                             "backend 'transformers' and NEXTGPT_LLM__ENGINE_PROCESS true")
        return self


class GatewaySettings(BaseModel):
    """The public API: limits on uploads, URLs handed to clients, streaming."""

    model_config = ConfigDict(extra="forbid")

    public_base_url: str | None = Field(
        default=None, pattern=r"^https?://", description="Base of artifact URLs (e.g. https://api.example.com/nextgpt)")
    url_signing_key: SecretStr | None = Field(
        default=None, description="HMAC key of artifact URLs; set the same on every gateway replica")
    artifact_url_ttl_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    max_files: int = Field(default=8, ge=0, le=64)
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="Whole request body")
    body_timeout_s: float = Field(default=120.0, gt=0, description="A request body must arrive within this (408)")
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, description="A request's head (line + headers) (431)")
    max_header_lines: int = Field(default=200, ge=8, description="Header lines of one request (431)")
    header_timeout_s: float = Field(default=30.0, gt=0, description="A request's head must arrive within this (408)")
    heartbeat_s: float = Field(default=15.0, gt=0)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Client addresses whose X-Forwarded-Proto/-Host/-Prefix are believed "
                                          '(comma-separated, or a JSON list)')
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description='Comma-separated, or a JSON list, e.g. ["https://app.example"]')
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"],
        description="Without PUBLIC_BASE_URL: Host headers artifact URLs may be built on (any port; '*.example.com' "
                    "for subdomains, '*' for any); a request with another Host gets relative URLs")
    rate_limit_per_minute: int | None = Field(default=None, ge=1, description="Chat requests per key; unset: off")
    conversation_ttl_s: int = Field(default=24 * 3600, ge=60, description="History kept after a conversation's last turn")
    max_conversation_turns: int = Field(default=64, ge=2, le=1024, description="Oldest turns are dropped beyond")
    max_conversations: int = Field(default=10_000, ge=1, description="Embedded mode: conversations kept in memory")
    resume_grace_s: float = Field(
        default=10.0, ge=0, le=600, description="A stream with no reader this long is cancelled (reconnect window)")
    replay_ttl_s: int = Field(default=300, ge=10, le=24 * 3600, description="A finished stream stays replayable")
    replay_max_events: int = Field(default=20_000, ge=100, le=1_000_000, description="Events kept per stream")
    replay_max_bytes: int = Field(
        default=256 * 2**20, ge=2**20,
        description="What this replica's ended streams may hold in memory together (media inline weigh most); past "
                    "it, the oldest ended go before replay_ttl_s")
    replay_inline_max_bytes: int = Field(
        default=2**20, ge=0,
        description="Distributed mode: the largest inline artifact (base64 characters) a stream keeps in Redis for "
                    "resumes on other replicas; a larger one is kept there with its URL only")
    stream_lease_s: float = Field(
        default=15.0, ge=5.0, le=300.0,
        description="Distributed mode: a replica that dies mid-turn leaves its streams' readers on other replicas "
                    "waiting this long, then they get stream_gone (its claim, renewed every third of it, lapses)")
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, le=3600,
        description="On a stop signal, the replies under way get this long to finish; then they end with an error "
                    "server_stopping (keep it under the orchestrator's grace: Helm sets it from the gateway's)")
    replay_write_linger_s: float = Field(
        default=0.02, ge=0, le=5.0,
        description="After a stream's first event, events gather this long per Redis write (resumes see them as late)")
    inline_max_bytes: int = Field(
        default=16 * 1024 * 1024, ge=0, description="Largest artifact returned inline (base64) when asked for")
    media_url_fetch: bool = Field(
        default=False, description="OpenAI endpoint: fetch media given by http(s) URL (image_url, video_url parts); "
                                   "off: only data URLs are taken. Every hop's address is checked (see media_url_private)")
    media_url_private: bool = Field(
        default=False, description="Also fetch from private, loopback and link-local addresses (a cluster's own "
                                   "services, a cloud's metadata service): only where every client is trusted")
    media_url_timeout_s: float = Field(default=10.0, gt=0, le=300, description="One URL's fetch, redirects included")
    media_url_max_redirects: int = Field(default=3, ge=0, le=10)

    @field_validator("trusted_proxies", "cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _list_from_env(cls, value: Any) -> Any:
        """An environment variable holds "a, b" or a JSON list; a malformed JSON list is reported on the field."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list ({exc.msg})") from exc
        return [part.strip() for part in text.split(",") if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER, extra="ignore", frozen=True,
        # Deployments pass every setting through (compose: ${VAR:-}); an empty value means "not set".
        env_ignore_empty=True,
    )

    bundle: Path | None = Field(default=None, description="Model bundle folder; default: the committed world bundle "
                                "(bundles/nextgpt-world); 'tiny': the random tiny bundle in cache_dir")
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    storage: StorageSettings = Field(default_factory=StorageSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    decoders: DecoderSettings = Field(default_factory=DecoderSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    api_keys: SecretStr | None = Field(
        default=None, description="Comma-separated API keys (NEXTGPT_API_KEYS); unset: no authentication")
    api_keys_file: Path | None = Field(
        default=None, description="File of API keys, one per line ('#' comments); joined with NEXTGPT_API_KEYS")

    @property
    def tiny_bundle_dir(self) -> Path:
        return self.cache_dir / "bundles" / "tiny-seed0"

    @property
    def artifacts_dir(self) -> Path:
        return self.storage.local_dir or self.cache_dir / "artifacts"


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(part) for part in loc).upper()


def load_settings(**overrides: object) -> Settings:
    """Read the settings once from the environment; ``overrides`` (e.g. CLI flags) win over it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(f"{_env_name(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigurationError(f"invalid settings: {problems}", code="invalid_settings") from exc
    except SettingsError as exc:  # a value the settings source could not even parse (e.g. malformed JSON)
        raise ConfigurationError(f"invalid settings: {exc}", code="invalid_settings") from exc


def env_names(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> list[str]:
    """Every environment variable the settings read, nested groups spelled out (for deployment checks and docs)."""
    names: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += env_names(annotation, prefix + name.upper() + ENV_NESTED_DELIMITER)
        else:
            names.append(prefix + name.upper())
    return names
