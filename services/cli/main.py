"""``nextgpt``: bundle tools and the serving commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer

from services.bundle.staging import check_replaceable
from services.world.pretrained import check_pretrained
from services.contracts.bundle_manifest import InputProjectionSpec
from services.contracts.errors import NextGPTError
from services.contracts.settings import Settings, load_settings
from services.training.sizes import HELD_OUT, POOL
from services.web.keep_alive import SERVER_IDLE_S

if TYPE_CHECKING:
    from services.training.stages import LoraOptions

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Serve NExT-GPT-style any-to-any models.")
bundle_app = typer.Typer(no_args_is_help=True, help="Build, convert and inspect model bundles.")
app.add_typer(bundle_app, name="bundle")

BundleOpt = Annotated[Optional[Path], typer.Option(
    help="Model bundle folder (default: the committed world bundle, bundles/nextgpt-world; 'tiny': the random "
         "tiny bundle, built on first use)")]
HostOpt = Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1)")]
PortOpt = Annotated[Optional[int], typer.Option(help="Port to bind (default 8000)", min=1, max=65535)]
ServicePortOpt = Annotated[int, typer.Option(help="Port to bind", min=1, max=65535)]  # a model service's own default


def _settings(**overrides: object) -> Settings:
    from services.cli.logs import configure_logging

    settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.log_level)
    return settings


@bundle_app.command("tiny")
def bundle_tiny(
    out: Annotated[Path, typer.Option(help="Folder to write the bundle to")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights", min=0)] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing folder")] = False,
) -> None:
    """Build the tiny bundle: the real architectures at tiny width, random weights, offline, in seconds."""
    check_replaceable(out, force=force)
    from services.bundle.tiny.build import build_tiny_bundle

    manifest = build_tiny_bundle(out, seed=seed, force=force)
    typer.echo(f"wrote {manifest.name} ({manifest.version}) to {out}")


@bundle_app.command("convert")
def bundle_convert(
    checkpoint: Annotated[Path, typer.Option(help="Folder with the release's pytorch_model.pt (+ added_tokens.json)")],
    vicuna: Annotated[Path, typer.Option(help="Vicuna-7B v0 folder (Hugging Face layout)")],
    imagebind: Annotated[Path, typer.Option(help="imagebind_huge.pth")],
    out: Annotated[Path, typer.Option(help="Folder to write the bundle to")],
    lora: Annotated[str, typer.Option(help="merge: into the LLM weights; adapter: a PEFT adapter for vLLM")] = "merge",
    image_decoder: Annotated[Optional[str], typer.Option(help="SD pipeline folder or hub id")] = None,
    video_decoder: Annotated[Optional[str], typer.Option(help="ZeroScope pipeline folder or hub id")] = None,
    audio_decoder: Annotated[Optional[str], typer.Option(help="AudioLDM pipeline folder or hub id")] = None,
    imagebind_config: Annotated[Optional[Path], typer.Option(help="JSON of ImageBind dims (default: huge)")] = None,
    hidden_state_offset: Annotated[int, typer.Option(help="-1: the released demo; 0: as in training")] = -1,
    name: Annotated[str, typer.Option(help="Bundle name")] = "nextgpt-7b-tiva-v0",
    force: Annotated[bool, typer.Option(help="Replace an existing folder")] = False,
) -> None:
    """Convert the released NExT-GPT checkpoint into a bundle, refusing any unused or missing key."""
    check_replaceable(out, force=force)
    from services.bundle.convert import ConvertOptions, convert_release
    from services.contracts.bundle_manifest import ImageBindConfig

    if lora not in ("merge", "adapter"):
        raise typer.BadParameter("must be 'merge' or 'adapter'", param_hint="--lora")
    if hidden_state_offset not in (-1, 0):
        raise typer.BadParameter("must be -1 or 0", param_hint="--hidden-state-offset")
    decoders = {m: s for m, s in (("image", image_decoder), ("video", video_decoder), ("audio", audio_decoder)) if s}
    config = ImageBindConfig.model_validate_json(imagebind_config.read_text()) if imagebind_config else ImageBindConfig()
    mode: Literal["merge", "adapter"] = "merge" if lora == "merge" else "adapter"
    offset: Literal[-1, 0] = -1 if hidden_state_offset == -1 else 0
    manifest = convert_release(ConvertOptions(
        checkpoint_dir=checkpoint, vicuna_dir=vicuna, imagebind=imagebind, out=out, decoders=decoders, lora=mode,
        imagebind_config=config, hidden_state_offset=offset, name=name, force=force,
    ))
    typer.echo(f"wrote {manifest.name} to {out}")


@bundle_app.command("inspect")
def bundle_inspect(path: Annotated[Path, typer.Argument(help="Bundle folder")]) -> None:
    """Validate a bundle against its manifest and print a summary as JSON."""
    from services.bundle.loader import load_bundle
    from services.cli.compose import bundle_summary

    typer.echo(json.dumps(bundle_summary(load_bundle(path)), indent=2))


@bundle_app.command("pack")
def bundle_pack(
    source: Annotated[Path, typer.Argument(help="Bundle folder")],
    out: Annotated[Path, typer.Option(help="Folder to write the packed bundle to")],
    force: Annotated[bool, typer.Option(help="Replace an existing folder")] = False,
) -> None:
    """Copy a bundle with its weights stored as float16 (loaded back at the services' own dtype)."""
    check_replaceable(out, force=force)
    from services.bundle.pack import pack_half

    pack_half(source, out, force=force)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    typer.echo(f"wrote {out} ({size / 2**20:.1f} MiB)")


@app.command("serve")
def serve(bundle: BundleOpt = None, host: HostOpt = None, port: PortOpt = None) -> None:
    """Embedded mode: the whole stack as one server (the world bundle unless --bundle; the LLM's running batch and
    the decoder pipelines in child processes of it)."""
    from services.cli.bundles import resolve_bundle
    from services.cli.checks import check_devices, check_port
    from services.runtime import children

    settings = _settings(bundle=bundle, host=host, port=port)
    check_port(settings.host, settings.port)
    check_devices(settings)
    resolved = resolve_bundle(settings)
    if settings.decoders.engine_process or (settings.llm.url is None and settings.llm.decodes_in_engine_process):
        children.start_server()  # before the imports below: the fork server imports beside them

    from services.cli.compose import embedded_app

    app_ = embedded_app(settings, resolved)
    _serve(app_, settings)


def _serve(app_: Any, settings: Settings) -> None:
    """The gateway's server (embedded mode's too): bounded request heads, and a bounded stop (the replies under way
    get NEXTGPT_GATEWAY__SHUTDOWN_GRACE_S, then end with server_stopping)."""
    from services.runtime.heap import freeze_loaded
    from services.web.graceful import serve

    # Last of the start-up hooks: after the models (embedded) and the connections they open are loaded.
    app_.state.gateway.on_startup.append(freeze_loaded)
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-* from any loopback client; the gateway
    # honours them from NEXTGPT_GATEWAY__TRUSTED_PROXIES only.
    serve(app_, settings.gateway.shutdown_grace_s, lambda: app_.state.gateway.streams.close("stop grace over"),
          host=settings.host, port=settings.port, log_level=settings.log_level, proxy_headers=False,
          http=_bounded_http(settings), timeout_keep_alive=SERVER_IDLE_S)


def _bounded_http(settings: Settings) -> type:
    from services.web.http_protocol import bounded_protocol

    g = settings.gateway
    return bounded_protocol(g.max_header_bytes, g.max_header_lines, g.header_timeout_s)


encoder_app = typer.Typer(no_args_is_help=True, help="The encoder service (ImageBind + input projection).")
app.add_typer(encoder_app, name="encoder")


@encoder_app.command("serve")
def encoder_serve(bundle: BundleOpt = None, host: HostOpt = None,
                  port: ServicePortOpt = 8001) -> None:
    """Serve POST /v1/encode; /readyz answers 503 until the model is loaded."""
    from prometheus_client import CollectorRegistry

    from services.cli.bundles import resolve_bundle
    from services.cli.checks import check_devices, check_port
    from services.cli.compose import StopOnLoadFailure
    from services.runtime.heap import freeze_loaded
    from services.encoder.app import build_encoder_app
    from services.encoder.compose import build_encoder_service
    from services.storage import build_artifact_store

    settings = _settings(bundle=bundle, host=host)
    check_port(settings.host, port, "--port")
    check_devices(settings, ("encoder",))
    registry = CollectorRegistry()
    resolved = resolve_bundle(settings)
    store = build_artifact_store(settings)
    stopper = StopOnLoadFailure("encoder")
    encoder_app_ = build_encoder_app(
        lambda: build_encoder_service(resolved, settings.encoder, registry, store), registry,
        settings.encoder.max_request_bytes, on_load_failure=stopper, on_loaded=freeze_loaded,
    )
    stopper.serve(encoder_app_, settings.host, port, settings.log_level)


llm_app = typer.Typer(no_args_is_help=True, help="The LLM service (signal tokens, output projectors).")
app.add_typer(llm_app, name="llm")


@llm_app.command("serve")
def llm_serve(bundle: BundleOpt = None, host: HostOpt = None,
              port: ServicePortOpt = 8002) -> None:
    """Serve POST /v1/generate (NDJSON stream); /readyz answers 503 until the model is loaded."""
    from services.cli.bundles import resolve_bundle
    from services.cli.checks import check_devices, check_port
    from services.runtime import children

    settings = _settings(bundle=bundle, host=host)
    check_port(settings.host, port, "--port")
    check_devices(settings, ("llm",))
    resolved = resolve_bundle(settings)
    if settings.llm.decodes_in_engine_process:
        children.start_server()  # before the imports below: the fork server imports beside them

    from prometheus_client import CollectorRegistry

    from services.cli.compose import StopOnLoadFailure
    from services.runtime.heap import freeze_loaded
    from services.llm.app import build_llm_app
    from services.llm.compose import build_llm_service

    registry = CollectorRegistry()
    stopper = StopOnLoadFailure("llm")
    app_ = build_llm_app(lambda: build_llm_service(resolved, settings.llm, registry), registry,
                         on_load_failure=stopper, on_loaded=freeze_loaded)
    stopper.serve(app_, settings.host, port, settings.log_level)


@llm_app.command("vllm-commands")
def llm_vllm_commands(
    python: Annotated[str, typer.Option(help="Python of the vLLM environment")] = ".venv-vllm/bin/python",
    bundle: BundleOpt = None,
    port: Annotated[int, typer.Option(help="Port of the vLLM server; the pooler takes the next one", min=1,
                                      max=65534)] = 8100,
    dtype: Annotated[str, typer.Option(help="float32 on CPU, float16/bfloat16 on GPU")] = "float32",
    max_num_seqs: Annotated[Optional[int], typer.Option(help="Bound on the running batch (vLLM's default)",
                                                        min=1)] = None,
) -> None:
    """Print the two commands that serve a bundle on vLLM (OpenAI server + hidden-state pooler); then run
    `nextgpt llm serve` with NEXTGPT_LLM__BACKEND=vllm and the two URLs. vLLM's environment needs this project
    installed without dependencies (`pip install --no-deps .`) for its plugin (services/llm/vllm_plugin.py)."""
    import shlex

    from services.cli.bundles import resolve_bundle
    from services.llm.vllm_launch import VLLM_ENV, pooler_args, server_args

    resolved = resolve_bundle(_settings(bundle=bundle))
    env = " ".join(f"{k}={v}" for k, v in VLLM_ENV.items())
    typer.echo(f"{env} {shlex.join(server_args(python, resolved, port, dtype, max_num_seqs=max_num_seqs))}")
    typer.echo(f"{env} PYTHONPATH=. {shlex.join(pooler_args(python, resolved, port + 1, dtype))}")
    typer.echo(f"NEXTGPT_LLM__BACKEND=vllm NEXTGPT_LLM__VLLM_URL=http://127.0.0.1:{port} "
               f"NEXTGPT_LLM__VLLM_POOLER_URL=http://127.0.0.1:{port + 1} nextgpt llm serve")


gateway_app = typer.Typer(no_args_is_help=True, help="The public gateway in distributed mode.")
app.add_typer(gateway_app, name="gateway")


@gateway_app.command("serve")
def gateway_serve(bundle: BundleOpt = None, host: HostOpt = None, port: PortOpt = None) -> None:
    """Serve the public API, with the encoder and LLM services at NEXTGPT_ENCODER__URL / NEXTGPT_LLM__URL and
    decoder workers behind Redis (NEXTGPT_REDIS__URL). Loads no model."""
    from services.cli.bundles import resolve_bundle
    from services.cli.checks import check_port
    from services.cli.compose import distributed_gateway_app

    settings = _settings(bundle=bundle, host=host, port=port)
    check_port(settings.host, settings.port)
    app_ = distributed_gateway_app(settings, resolve_bundle(settings))
    _serve(app_, settings)


@app.command("worker")
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues (modalities) to consume")] = "image,video,audio",
    bundle: BundleOpt = None,
    hostname: Annotated[Optional[str], typer.Option(help="Celery node name (default: nextgpt-<queues>@host)")] = None,
) -> None:
    """A Celery decoder worker: loads the pipelines of its queues once, then runs decode jobs in batches."""
    from services.cli.bundles import resolve_bundle
    from services.cli.checks import check_devices
    from services.contracts.celery_config import QUEUES
    from services.runtime import children

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if unknown or not names:
        raise typer.BadParameter(f"unknown queues {unknown}; choose from {list(QUEUES)}", param_hint="--queues")
    settings = _settings(bundle=bundle)
    check_devices(settings, ("decoders",))
    resolved = resolve_bundle(settings)
    if settings.decoders.engine_process:
        children.start_server()  # before the imports below (torch, Celery): the fork server imports beside them

    from celery.signals import worker_shutdown

    from services.decoders.celery_app import make_worker_app
    from services.decoders.compose import build_runner
    from services.decoders.pipeline_process import PipelineProcess
    from services.jobs.book import RedisJobBook
    from services.jobs.redis_clients import sync_redis

    book = RedisJobBook(sync_redis(settings.redis.url), settings.redis.key_prefix)
    registry = None
    if settings.decoders.metrics_port:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        # One process (the solo pool below), so one registry holds the worker's every job.
        start_http_server(settings.decoders.metrics_port, settings.decoders.metrics_host, registry=registry)
    runner = build_runner(settings, resolved, names, book, own_process=settings.decoders.engine_process,
                          registry=registry)  # type: ignore[arg-type]
    pipelines = runner.pipelines
    if isinstance(pipelines, PipelineProcess):
        # Consume nothing before the pipelines load: a worker that cannot load them exits here, with the reason.
        try:
            pipelines.wait_ready()
        except RuntimeError as exc:
            pipelines.close()
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        worker_shutdown.connect(lambda **_: pipelines.close(), weak=False)
    celery = make_worker_app(settings, lambda: runner)
    # One pipeline call at a time per process (a GPU runs one diffusion at a time); scale with more workers. The
    # call takes up to max_batch jobs: the worker holds that many messages unacknowledged (the prefetch), so they
    # can be run together.
    celery.worker_main([
        "worker", f"--queues={','.join(names)}", "--pool=solo", "--concurrency=1",
        f"--prefetch-multiplier={settings.decoders.max_batch}",
        f"--loglevel={settings.log_level.upper()}", f"--hostname={hostname or 'nextgpt-' + '-'.join(names) + '@%h'}",
        "--without-gossip", "--without-mingle",
    ])


world_app = typer.Typer(no_args_is_help=True, help="The synthetic world: data, pretrained stand-ins, evaluation.")
app.add_typer(world_app, name="world")


@world_app.command("data")
def world_data(
    out: Annotated[Path, typer.Option(help="Folder to write the world to")],
    images: Annotated[int, typer.Option(help="Number of pictures", min=1)] = 2000,
    videos: Annotated[int, typer.Option(help="Number of clips", min=1)] = 2000,
    audios: Annotated[int, typer.Option(help="Number of tones", min=1)] = 2000,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same samples", min=0)] = 0,
) -> None:
    """Write world samples (pictures, clips, tones with captions) in the documented world format."""
    from services.world.dataset import write_world

    write_world(out, seed, {"image": images, "video": videos, "audio": audios})
    typer.echo(f"wrote {images} pictures, {videos} clips, {audios} tones (seed {seed}) to {out}")


@world_app.command("pretrain")
def world_pretrain(
    data: Annotated[Path, typer.Option(help="World folder (from `nextgpt world data`)")],
    work: Annotated[Path, typer.Option(help="Folder for checkpoints, loss logs and exported parts")],
    part: Annotated[list[str], typer.Option(help="Part(s) to train (repeatable), or 'all'")] = ["all"],  # noqa: B006
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: each part's recipe)", min=1)] = None,
    seed: Annotated[int, typer.Option(help="Seed", min=0)] = 0,
) -> None:
    """Pretrain the frozen parts' stand-ins on the world; resumes from the checkpoints in --work."""
    from services.cli.logs import configure_logging
    from services.world.pretrain.parts import DEFAULT_STEPS, PARTS, write_result

    configure_logging("info")
    names = list(PARTS) if "all" in part else part
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        raise typer.BadParameter(f"unknown parts {unknown}; choose from {list(PARTS)} or all", param_hint="--part")
    for name in names:
        result = PARTS[name](data, work, steps or DEFAULT_STEPS[name], seed, True)
        write_result(result, work)
        typer.echo(f"{name}: exported {result.exported} {result.metrics}")


@world_app.command("invariance")
def world_invariance(
    bundle: Annotated[Path, typer.Option(help="Bundle whose ImageBind to train (its weights are rewritten)")],
    work: Annotated[Path, typer.Option(help="Folder for checkpoints and loss logs")],
    phase: Annotated[list[int], typer.Option(help="6 (backgrounds), 7 (tone lengths); repeatable")] = [6, 7],  # noqa: B006
    steps: Annotated[Optional[int], typer.Option(help="Steps per phase (default: the recipe's)", min=1)] = None,
    seed: Annotated[int, typer.Option(help="Seed (phase n's loop seed is seed + n - 1, as in the recipe)",
                                     min=0)] = 0,
) -> None:
    """ImageBind's invariance phases on a bundle that has stages 1-3 already: a shape on a background and a tone of
    0.5-8 s come to read as the world's own; its features for the world's own media stay, so no stage is
    retrained. Resumes from --work."""
    from services.cli.logs import configure_logging
    from services.world.pretrain.invariance import INVARIANCE_PHASES, distil_bundle_encoder

    configure_logging("info")
    unknown = sorted(set(phase) - set(INVARIANCE_PHASES))
    if unknown:  # before the bundle is read (distil_bundle_encoder refuses them too, for other callers)
        raise typer.BadParameter(f"unknown phases {unknown}; choose from {sorted(INVARIANCE_PHASES)}",
                                 param_hint="--phase")
    written = distil_bundle_encoder(bundle, work, phase, steps=steps, seed=seed)
    typer.echo(f"wrote {written}")


@world_app.command("vae-decoder")
def world_vae_decoder(
    bundle: Annotated[Path, typer.Option(help="Bundle whose picture VAE to refine (its weights are rewritten)")],
    work: Annotated[Path, typer.Option(help="Folder for checkpoints and the loss log")],
    steps: Annotated[Optional[int], typer.Option(help="Steps (default: the recipe's)", min=1)] = None,
    seed: Annotated[int, typer.Option(help="Seed", min=0)] = 0,
) -> None:
    """The picture VAE's decoder phase on a bundle that has stages 1-3 already: its decoder learns to draw the
    small shapes its encoder's latents hold; the encoder, and so everything trained over it, stays. Written to the
    image decoder and to the clip decoder where it shares that VAE. Resumes from --work."""
    from services.cli.logs import configure_logging
    from services.world.pretrain.vae_decoder import refine_bundle_vae

    configure_logging("info")
    try:
        written = refine_bundle_vae(bundle, work, steps=steps, seed=seed)
    except ValueError as exc:  # a bundle without a picture VAE: said before any training, without a traceback
        raise typer.BadParameter(str(exc), param_hint="--bundle") from exc
    for folder in written:
        typer.echo(f"wrote {folder}")


@world_app.command("assemble")
def world_assemble(
    work: Annotated[Path, typer.Option(help="Pretraining work folder")],
    out: Annotated[Path, typer.Option(help="Folder to write the base bundle to")],
    seed: Annotated[int, typer.Option(help="Seed of the untrained projections", min=0)] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing folder")] = False,
) -> None:
    """Assemble the pretrained stand-ins into a bundle (projections untrained): where NExT-GPT's stages start."""
    check_replaceable(out, force=force)
    check_pretrained(work)
    from services.world.assemble import assemble_base_bundle

    manifest = assemble_base_bundle(work, out, seed=seed, force=force)
    typer.echo(f"wrote {manifest.name} ({manifest.version}) to {out}")


@world_app.command("eval")
def world_eval(
    bundle: Annotated[Path, typer.Option(help="Bundle whose stand-ins to check", exists=True, file_okay=False)],
    work: Annotated[Optional[Path], typer.Option(help="Pretraining work folder (full ImageBind, for retrieval)",
                                                 exists=True, file_okay=False)] = None,
    count: Annotated[int, typer.Option(help="Fresh samples per modality for retrieval", min=1)] = 200,
    decoder_count: Annotated[int, typer.Option(help="Captions per decoder", min=1)] = 48,
    steps: Annotated[int, typer.Option(help="Diffusion steps per generation", min=1)] = 25,
    part: Annotated[list[str], typer.Option(help="retrieval, language, image, video, audio (repeatable)")] = [  # noqa: B006
        "retrieval", "language", "image", "video", "audio"],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the table as JSON")] = None,
    device: Annotated[str, typer.Option(help="Where the decoders run (cuda: fp16, as served there)")] = "cpu",
) -> None:
    """Held-out checks of the stand-ins on fresh world samples: zero-shot retrieval, the language model's answers,
    decoders from captions."""
    from services.world.evaluate import EVAL_PARTS, evaluate_stand_ins, format_table

    unknown = sorted(set(part) - set(EVAL_PARTS))
    if unknown:
        raise typer.BadParameter(f"unknown parts {unknown}; choose from {list(EVAL_PARTS)}", param_hint="--part")
    weights = work / "imagebind" / "imagebind.safetensors" if work else None
    if "retrieval" in part and (weights is None or not weights.is_file()):
        # Checked before any model loads (the default parts include retrieval: without --work it failed with a
        # traceback).
        found = f"{work} holds no imagebind/imagebind.safetensors" if work else "no --work given"
        raise typer.BadParameter(
            f"retrieval needs the full pretrained ImageBind (its text branch, which bundles do not carry) from the "
            f"pretraining work folder ({found}); leave it out with --part, e.g. --part language --part image",
            param_hint="--work")
    table = evaluate_stand_ins(bundle, weights, count=count, decoder_count=decoder_count, steps=steps, parts=part,
                               device=device, progress=True)
    typer.echo(format_table(table))
    if json_out:
        json_out.write_text(json.dumps(table, indent=2) + "\n")


train_app = typer.Typer(no_args_is_help=True, help="NExT-GPT's training stages over a bundle's frozen parts.")
app.add_typer(train_app, name="train")


def _lora_options(lora: Optional[tuple[str, int, int, bool]]) -> LoraOptions:
    from services.training.stages import LoraOptions

    if lora is None:
        return LoraOptions()
    name, rank, alpha, resume = lora
    return LoraOptions(name=name, rank=rank, alpha=alpha, resume=resume)


def _train(stage: str, bundle: Path, data: Path, out: Path, work: Optional[Path], steps: Optional[int], seed: int,
           force: bool, media_root: Optional[Path], deepspeed: Optional[Path], pool: int, held_out: int,
           lora: Optional[tuple[str, int, int, bool]] = None,  # instruct's: name, rank, alpha, resume
           input_projection: Optional[InputProjectionSpec] = None) -> None:
    check_replaceable(out, force=force)  # at once, before the libraries load (train_stage checks it again)
    from services.cli.logs import configure_logging
    from services.training.release_data import DataFormatError
    from services.training.runner import StageRun, train_stage

    configure_logging("info")
    try:
        report = train_stage(StageRun(
            stage=stage, bundle=bundle, data=data, out=out, work=work or out.with_name(out.name + ".work"),
            steps=steps, seed=seed, lora=_lora_options(lora), force=force, pool_size=pool,
            held_out=held_out, media_root=media_root, input_projection=input_projection, deepspeed=deepspeed,
        ))
    except DataFormatError as exc:  # what is wrong with the data, said as such (not a traceback)
        raise typer.BadParameter(str(exc), param_hint="--data") from exc
    except ValueError as exc:  # options the bundle cannot take (a LoRA to resume it lacks, a projection design)
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(json.dumps(report, indent=2))


TrainBundle = Annotated[Path, typer.Option(help="Bundle to start from")]
TrainData = Annotated[Path, typer.Option(
    help="World folder (from `nextgpt world data`), or a release-format JSON file (CC3M / WebVid / AudioCaps "
         "captions, T2M / MosIT instructions)")]
MediaRoot = Annotated[Optional[Path], typer.Option(help="Release-format data: folder of the media files it names")]
TrainOut = Annotated[Path, typer.Option(help="Folder to write the trained bundle to")]
TrainWork = Annotated[Optional[Path], typer.Option(help="Checkpoints and loss log (default: <out>.work)")]
TrainSteps = Annotated[Optional[int], typer.Option(help="Steps (default: the stage's recipe)", min=1)]
TrainSeed = Annotated[int, typer.Option(help="Seed", min=0)]
LoraName = Annotated[str, typer.Option(help="Name of the LoRA adapter (instruct)")]
LoraRank = Annotated[int, typer.Option(help="LoRA r (the release: 32)", min=1)]
LoraAlpha = Annotated[int, typer.Option(help="LoRA alpha (the release: 32)", min=1)]
ResumeLora = Annotated[bool, typer.Option(
    help="Start from the bundle's own adapter of that name (train a trained bundle further on a changed mix) "
         "instead of a fresh one")]
Force = Annotated[bool, typer.Option(help="Replace an existing output folder")]
ProjectionKind = Annotated[Optional[str], typer.Option(
    help="Train a fresh input projection of this design: linear (the release, one LLM token per item) or group "
         "(the paper's concept tokens over ImageBind's token-level features); default: the bundle's own")]
GroupTokens = Annotated[str, typer.Option(help="group: group tokens per grouping stage (the newer code: 64,8)")]
GroupWidth = Annotated[int, typer.Option(help="group: width of the grouping blocks (the newer code: 512)",
                                         min=1)]
TrainPool = Annotated[int, typer.Option(
    "--pool", min=1, help="Training examples drawn and encoded before the first step (a world's items recur in "
                          "them under different phrasings and dialogues)")]
HeldOut = Annotated[int, typer.Option(
    min=0, help="Held-out examples whose losses the report gives before and after training (0: no check)")]
DeepSpeed = Annotated[Optional[Path], typer.Option(
    help="DeepSpeed config: ZeRO shards the optimizer state and gradients over the processes of `accelerate "
         "launch` (deploy/training/zero2.json: ZeRO-2, as the release trains)", exists=True, dir_okay=False)]


@train_app.command("align-encoder")
def train_align_encoder(bundle: TrainBundle, data: TrainData, out: TrainOut, work: TrainWork = None,
                        steps: TrainSteps = None, seed: TrainSeed = 0, force: Force = False,
                        media_root: MediaRoot = None, input_projection: ProjectionKind = None,
                        group_tokens: GroupTokens = "64,8", group_width: GroupWidth = 512,
                        deepspeed: DeepSpeed = None, pool: TrainPool = POOL, held_out: HeldOut = HELD_OUT) -> None:
    """Stage 1: the input projection learns X -> caption; ImageBind and the LLM frozen."""
    spec = None
    if input_projection is not None:
        try:
            groups = [int(n) for n in group_tokens.split(",")]
            spec = InputProjectionSpec(kind=input_projection, groups=groups, width=group_width,
                                       num_heads=min(8, group_width))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    _train("align-encoder", bundle, data, out, work, steps, seed, force, media_root, deepspeed, pool, held_out,
           input_projection=spec)


@train_app.command("align-decoder")
def train_align_decoder(bundle: TrainBundle, data: TrainData, out: TrainOut, work: TrainWork = None,
                        steps: TrainSteps = None, seed: TrainSeed = 0, force: Force = False,
                        media_root: MediaRoot = None, deepspeed: DeepSpeed = None, pool: TrainPool = POOL,
                        held_out: HeldOut = HELD_OUT) -> None:
    """Stage 2: output projectors + signal-token rows learn caption -> signal group (NLL + L2 to the decoders'
    text encoders)."""
    _train("align-decoder", bundle, data, out, work, steps, seed, force, media_root, deepspeed, pool, held_out)


@train_app.command("instruct")
def train_instruct(bundle: TrainBundle, data: TrainData, out: TrainOut, work: TrainWork = None,
                   steps: TrainSteps = None, seed: TrainSeed = 0, lora_name: LoraName = "nextgpt",
                   lora_rank: LoraRank = 32, lora_alpha: LoraAlpha = 32, resume_lora: ResumeLora = False,
                   force: Force = False, media_root: MediaRoot = None, deepspeed: DeepSpeed = None,
                   pool: TrainPool = POOL, held_out: HeldOut = HELD_OUT) -> None:
    """Stage 3: modality-switching instruction tuning: LoRA + both projections on mixed dialogues."""
    _train("instruct", bundle, data, out, work, steps, seed, force, media_root, deepspeed, pool, held_out,
           lora=(lora_name, lora_rank, lora_alpha, resume_lora))


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a running stack through its public API.")
app.add_typer(eval_app, name="eval")


@eval_app.command("world")
def eval_world(
    url: Annotated[str, typer.Option(help="Base URL of the gateway, e.g. http://127.0.0.1:8000")],
    api_key: Annotated[Optional[str], typer.Option(help="Bearer key (default: NEXTGPT_EVAL_API_KEY)",
                                                   envvar="NEXTGPT_EVAL_API_KEY")] = None,
    count: Annotated[int, typer.Option(help="Items per task", min=1)] = 12,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the table as JSON")] = None,
    modality: Annotated[Optional[list[str]], typer.Option(
        help="Run only the rows whose inputs and outputs are all among these (repeatable; default: image, video, "
             "audio); each row keeps the items it has in a full run")] = None,
) -> None:
    """Semantic evaluation on fresh world samples and held-out phrasings: describe (the world's media, shapes on
    backgrounds, a transparent picture, longer tones), generate, image -> video, two media in one reply, a
    follow-up turn, a second drawing in a conversation. Prints a table of accuracies."""
    from services.world.api_eval import MODALITIES, WorldClient, check_modalities, evaluate_api
    from services.world.evaluate import format_table

    chosen = modality or list(MODALITIES)
    try:
        check_modalities(chosen)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--modality") from exc
    import httpx

    try:
        table = evaluate_api(WorldClient(url, api_key, modalities=chosen), count=count, modalities=chosen,
                             progress=lambda s: typer.echo(s, err=True))
    except httpx.HTTPStatusError as exc:  # a refused key, a stack not ready: what it answered, not a traceback
        typer.echo(f"error: {url} answered {exc.response.status_code}: {exc.response.text[:300]}", err=True)
        raise typer.Exit(2) from exc
    except httpx.TransportError as exc:
        typer.echo(f"error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(format_table(table))
    if json_out:
        json_out.write_text(json.dumps(table, indent=2) + "\n")


@app.command("health")
def health(
    url: Annotated[Optional[list[str]], typer.Option(help="An HTTP endpoint that must answer 2xx (repeatable)")] = None,
    redis_: Annotated[bool, typer.Option("--redis", help="NEXTGPT_REDIS__URL must answer PING")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds per check", min=0.1)] = 4.0,
) -> None:
    """Container health check (exit 0 healthy, 1 not): the slim images carry no curl."""
    from services.cli.health import check_redis, check_url

    if not url and not redis_:
        raise typer.BadParameter("give --url and/or --redis", param_hint="--url")
    problems = [p for p in (check_url(u, timeout) for u in url or []) if p]
    if redis_:
        problems += [p for p in [check_redis(load_settings().redis.url, timeout)] if p]
    for problem in problems:
        typer.echo(f"unhealthy: {problem}", err=True)
    raise typer.Exit(1 if problems else 0)


def main() -> None:
    from services.runtime.library_noise import quiet_model_libraries

    quiet_model_libraries()
    try:
        app()
    except NextGPTError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(2)
    except (FileExistsError, FileNotFoundError) as exc:
        # What a command needs on disk is missing or in the way (its message says which and what to do, e.g.
        # "pretrain these parts first"): the words, not a traceback.
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    finally:
        if "torch.distributed" in sys.modules:  # a training run under torchrun / accelerate launch
            from services.world.pretrain.loop import end_processes

            end_processes()


if __name__ == "__main__":  # `python -m services.cli.main` (torchrun in an environment without the script)
    main()
