"""Held-out checks of the world's stand-ins: retrieval for ImageBind, measured classes for the decoders.

Every check draws fresh samples (the evaluation seed is not a training seed) and reads classes back with the
measures of ``services.world.measures``; a result is the fraction of items whose class matches what was asked.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.world.attributes import ATTRIBUTES, Attributes, WorldModality
from services.world.measures import measure
from services.world.render import render

EVAL_SEED = 1_000_003  # never a training seed: fresh positions, sizes, hues, frequencies


@dataclass
class Score:
    right: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.right / self.total if self.total else 0.0


def score_attributes(asked: Iterable[Attributes], got: Iterable[Attributes], names: Iterable[str]) -> dict[str, Score]:
    scores: dict[str, Score] = defaultdict(Score)
    names = list(names)
    for want, have in zip(asked, got):
        for name in names:
            scores[name].total += 1
            scores[name].right += int(getattr(want, name) == getattr(have, name))
    return dict(scores)


def fresh_requests(modality: WorldModality, count: int, seed: int = EVAL_SEED) -> list[Attributes]:
    """Class combinations to ask for, drawn like the world's own samples."""
    return [render(modality, seed, i).attributes for i in range(count)]


def decoder_output(modality: WorldModality, pipe: Any, captions: list[str], steps: int, guidance: float,
                   seed: int) -> list[np.ndarray]:
    """Generate from captions through the pipeline's own text encoder: images/frames in [0, 1], audio waves."""
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        if modality == "image":
            out = pipe(captions, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                       generator=generator, output_type="np")
            return list(out.images)
        if modality == "video":
            out = pipe(captions, num_frames=8, height=64, width=64, num_inference_steps=steps,
                       guidance_scale=guidance, generator=generator, output_type="np")
            return list(np.asarray(out.frames))
        out = pipe(captions, audio_length_in_s=1.0, num_inference_steps=steps, guidance_scale=guidance,
                   generator=generator)
        return list(out.audios)


def evaluate_decoder(modality: WorldModality, pipe: Any, count: int = 48, steps: int = 25, guidance: float = 7.5,
                     batch: int = 16, seed: int = EVAL_SEED, progress: bool = False) -> dict[str, Score]:
    """``progress``: a bar of the captions drawn (on a CPU a decoder's 48 take minutes)."""
    from tqdm import tqdm

    from services.world.attributes import caption

    asked = fresh_requests(modality, count, seed)
    made: list[Attributes] = []
    with tqdm(total=count, desc=f"{modality} decoder", unit="caption", disable=not progress) as bar:
        for i in range(0, count, batch):
            chunk = asked[i:i + batch]
            outputs = decoder_output(modality, pipe, [caption(modality, a) for a in chunk], steps, guidance, seed + i)
            made += [measure(modality, o) for o in outputs]
            bar.update(len(chunk))
    names = [n for n in ATTRIBUTES[modality] if not (modality == "video" and n == "size")]
    return score_attributes(asked, made, names)


def load_pipeline(modality: WorldModality, path: Path, device: str = "cpu") -> Any:
    """On a GPU in fp16, as the decoders are served there (the check that half precision keeps their meaning)."""
    from diffusers import AudioLDMPipeline, StableDiffusionPipeline, TextToVideoSDPipeline

    cls = {"image": StableDiffusionPipeline, "video": TextToVideoSDPipeline, "audio": AudioLDMPipeline}[modality]
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False} if modality == "image" else {}
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = cls.from_pretrained(str(path), dtype=dtype, **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_imagebind(weights: Path, config: Any = None) -> Any:
    from safetensors.torch import load_file

    from services.modeling.imagebind import build_imagebind
    from services.world.pretrain.imagebind import WORLD_IMAGEBIND

    model = build_imagebind(config or WORLD_IMAGEBIND)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


EVAL_PARTS = ("retrieval", "language", "image", "video", "audio")


def evaluate_stand_ins(bundle_dir: Path, imagebind_weights: Path | None, count: int = 200, decoder_count: int = 48,
                       steps: int = 25, parts: Iterable[str] = EVAL_PARTS, seed: int = EVAL_SEED, device: str = "cpu",
                       progress: bool = False) -> dict[str, dict[str, float]]:
    """The table of `nextgpt world eval`: retrieval top-1 per modality, the language model's answers to held-out
    questions about things described in words, and each decoder's measured classes.

    Retrieval needs ImageBind's text branch, which bundles do not carry: ``imagebind_weights`` is the full
    pretrained ImageBind (``<work>/imagebind/imagebind.safetensors``)."""
    from services.bundle.loader import load_bundle
    from services.world.dataset import generate_split
    from services.world.pretrain.imagebind import retrieval_accuracy

    bundle = load_bundle(bundle_dir)
    table: dict[str, dict[str, float]] = {}
    parts = list(parts)
    if "retrieval" in parts:
        if imagebind_weights is None:
            raise ValueError("retrieval needs the full pretrained ImageBind weights (--work)")
        model = load_imagebind(imagebind_weights, bundle.manifest.encoder.config)
        table["retrieval top-1"] = {
            m: retrieval_accuracy(model, generate_split(m, seed, count)) for m in ("image", "video", "audio")
        }
    if "language" in parts:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from services.world.pretrain.language import answer_accuracy

        llm_dir = bundle.path(bundle.manifest.llm.path)
        table["language"] = answer_accuracy(AutoModelForCausalLM.from_pretrained(str(llm_dir)),
                                            AutoTokenizer.from_pretrained(str(llm_dir)), seed=seed)
    for modality in ("image", "video", "audio"):
        if modality in parts:
            pipe = load_pipeline(modality, Path(bundle.decoder_source(modality)), device)  # type: ignore[arg-type]
            scores = evaluate_decoder(modality, pipe, decoder_count, steps, seed=seed,  # type: ignore[arg-type]
                                      progress=progress)
            table[f"{modality} decoder"] = {k: v.accuracy for k, v in scores.items()}
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    lines = ["| check | measure | accuracy |", "|---|---|---|"]
    for check, row in table.items():
        lines += [f"| {check} | {name} | {value:.1%} |" for name, value in row.items()]
    return "\n".join(lines)
