"""The three diffusers pipelines, loaded once per worker process, conditioned with ``prompt_embeds`` from the
projectors. The unconditional embedding of ``""`` (what the reference's pipelines compute for guidance) is
computed once per pipeline and reused."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from services.bundle.loader import Bundle
from services.contracts.bundle_manifest import DecoderDefaults, Modality
from services.contracts.decoders import DecodeOptions

log = logging.getLogger(__name__)
StepCallback = Callable[[int, int], None]
# Asked about once a second while a step runs, by a generator that can stop a step (one in a process of its own):
# raises to stop the call, as a step callback does (a cancel then takes effect within the poll, not a step later).
StopCheck = Callable[[], None]


@dataclass(frozen=True)
class ResolvedOptions:
    steps: int
    guidance_scale: float
    seed: int
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    fps: int | None = None
    seconds: float | None = None
    sample_rate: int | None = None


def resolve(options: DecodeOptions, defaults: DecoderDefaults, seed: int) -> ResolvedOptions:
    def pick(name: str) -> Any:
        value = getattr(options, name)
        return getattr(defaults, name) if value is None else value

    return ResolvedOptions(
        steps=pick("steps"), guidance_scale=pick("guidance_scale"),
        seed=options.seed if options.seed is not None else seed,
        height=pick("height"), width=pick("width"), frames=pick("frames"), fps=pick("fps"),
        seconds=pick("seconds"), sample_rate=defaults.sample_rate,
    )


@dataclass
class Generated:
    modality: Modality
    image: Any = None  # PIL image
    frames: np.ndarray | None = None  # (F, H, W, 3) in [0, 1]
    audio: np.ndarray | None = None  # (samples,)
    sample_rate: int | None = None


class CallTimeLimitError(RuntimeError):
    """The call was stopped mid-step at its time limit (a step longer than the time left; only a generator in a
    process of its own can stop one): its jobs fail as timed out, and are not run again one by one."""


class BatchGenerator(Protocol):
    """What the runner needs of its pipelines: ``DecoderPipelines`` here, or the same in a child process."""

    def generate_batch(self, modality: Modality, conditioning: torch.Tensor, seeds: list[int],
                       opts: ResolvedOptions, on_step: StepCallback,
                       check: StopCheck | None = None) -> list[Generated]: ...


class DecoderPipelines:
    def __init__(self, bundle: Bundle, modalities: list[Modality], device: str = "cpu") -> None:
        self.bundle = bundle
        self.device = torch.device(device)
        # fp16 on GPU as the reference runs them; fp32 on CPU, where half precision is slow or unsupported.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.pipes: dict[Modality, Any] = {}
        self.uncond: dict[Modality, torch.Tensor] = {}
        for modality in modalities:
            self._load(modality)

    def _load(self, modality: Modality) -> None:
        from diffusers import AudioLDMPipeline, StableDiffusionPipeline, TextToVideoSDPipeline
        from diffusers.utils import logging as diffusers_logging

        # Its "Loading pipeline components" bar: instant here, a line of carriage returns in a server's log
        # (services.runtime.library_noise); the pipelines' own step bars are turned off below.
        diffusers_logging.disable_progress_bar()
        cls = {"image": StableDiffusionPipeline, "video": TextToVideoSDPipeline, "audio": AudioLDMPipeline}[modality]
        started = time.perf_counter()
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if modality == "image":
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(self.bundle.decoder_source(modality), **kwargs).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipes[modality] = pipe
        self.uncond[modality] = self._unconditional(modality, pipe)
        log.info("loaded %s decoder in %.1f s", modality, time.perf_counter() - started)

    @torch.inference_mode()
    def _unconditional(self, modality: Modality, pipe: Any) -> torch.Tensor:
        if modality == "audio":
            # AudioLDM conditions on CLAP's projected text embedding, L2-normalised.
            tokens = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").to(self.device)
            out = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).text_embeds
            return F.normalize(out, dim=-1)
        embeds, _ = pipe.encode_prompt("", self.device, 1, False)
        return embeds

    def generate(self, modality: Modality, conditioning: torch.Tensor, opts: ResolvedOptions,
                 on_step: StepCallback) -> Generated:
        return self.generate_batch(modality, conditioning, [opts.seed], opts, on_step)[0]

    def generate_batch(self, modality: Modality, conditioning: torch.Tensor, seeds: list[int],
                       opts: ResolvedOptions, on_step: StepCallback,
                       check: StopCheck | None = None) -> list[Generated]:
        """Several items of one modality that share ``opts`` (all but the seed) in one pipeline call.
        ``conditioning``: (items, ...) ; one generator per item, so an item's noise is the same as alone.
        ``check`` is not used: in this process nothing can stop a step, and ``on_step`` runs between steps."""
        pipe = self.pipes[modality]
        count = len(seeds)
        cond = conditioning.to(device=self.device, dtype=self.dtype)
        uncond = self.uncond[modality].to(dtype=self.dtype).expand(count, *self.uncond[modality].shape[1:])
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        common = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=opts.steps,
                      guidance_scale=opts.guidance_scale, generator=generators)
        if modality == "image":
            def on_end(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                on_step(step + 1, opts.steps)
                return kwargs

            out = pipe(height=opts.height, width=opts.width, callback_on_step_end=on_end, **common)
            return [Generated(modality, image=image) for image in out.images]
        legacy: Callable[[int, Any, Any], None] = lambda step, _t, _latents: on_step(step + 1, opts.steps)  # noqa: E731
        if modality == "video":
            out = pipe(num_frames=opts.frames, height=opts.height, width=opts.width, callback=legacy,
                       callback_steps=1, **common)
            return [Generated(modality, frames=np.asarray(frames, dtype=np.float32)) for frames in out.frames]
        out = pipe(audio_length_in_s=opts.seconds, callback=legacy, callback_steps=1, **common)
        rate = int(pipe.vocoder.config.sampling_rate)
        return [Generated(modality, audio=np.asarray(audio, dtype=np.float32), sample_rate=rate)
                for audio in out.audios]
