"""Open a model bundle and check it against its manifest before any service loads weights from it.

Every problem found is reported at once, each naming the file it is about, so that a broken conversion is
fixed in one round instead of one error per start.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from services.bundle.manifest_io import read_manifest
from services.bundle.safetensors_header import read_shapes
from services.contracts.bundle_manifest import BundleManifest, Modality, ProjectorSpec
from services.contracts.errors import BundleError

_PIPELINE_CLASSES = {
    "stable_diffusion": "StableDiffusionPipeline",
    "text_to_video_sd": "TextToVideoSDPipeline",
    "audioldm": "AudioLDMPipeline",
}


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: BundleManifest

    def path(self, relative: str) -> Path:
        return resolve_inside(self.root, relative)

    def decoder_source(self, modality: Modality) -> str:
        """A local pipeline directory, or the hub id of a decoder whose weights live outside the bundle."""
        source = self.manifest.outputs[modality].decoder.source
        return source.removeprefix("hub:") if source.startswith("hub:") else str(self.path(source))


def resolve_inside(root: Path, relative: str) -> Path:
    candidate = (root / relative).resolve()
    if Path(relative).is_absolute() or not candidate.is_relative_to(root.resolve()):
        raise BundleError(f"{root}: path {relative!r} in the manifest leaves the bundle", code="bundle_path")
    return candidate


def load_bundle(root: Path | str) -> Bundle:
    root = Path(root).resolve()
    bundle = Bundle(root=root, manifest=read_manifest(root))
    problems = _Checker(bundle).run()
    if problems:
        raise BundleError(
            f"bundle {root} is invalid:\n  - " + "\n  - ".join(problems), code="bundle_invalid"
        )
    return bundle


class _Checker:
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.m = bundle.manifest
        self.problems: list[str] = []

    def run(self) -> list[str]:
        for check in (self._llm, self._tokens, self._loras, self._encoder, self._outputs):
            try:
                check()
            except BundleError as exc:
                self.problems.append(exc.message)
        return self.problems

    def _file(self, relative: str) -> Path | None:
        path = self.bundle.path(relative)
        if not path.is_file():
            self.problems.append(f"{path}: file not found")
            return None
        return path

    def _shapes(self, relative: str) -> dict[str, tuple[int, ...]] | None:
        path = self._file(relative)
        if path is None:
            return None
        try:
            return read_shapes(path)
        except ValueError as exc:
            self.problems.append(str(exc))
            return None

    def _expect(self, path: str, shapes: dict[str, tuple[int, ...]], name: str, shape: tuple[int, ...]) -> None:
        found = shapes.get(name)
        if found is None:
            self.problems.append(f"{self.bundle.path(path)}: tensor {name!r} not found")
        elif found != shape:
            self.problems.append(f"{self.bundle.path(path)}: tensor {name!r} has shape {list(found)}, expected {list(shape)}")

    def _json(self, relative: str) -> dict[str, Any] | None:
        path = self._file(relative)
        if path is None:
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            self.problems.append(f"{path}: not valid JSON ({exc})")
            return None
        return data if isinstance(data, dict) else None

    def _llm(self) -> None:
        llm = self.m.llm
        config = self._json(f"{llm.path}/config.json")
        if config is None:
            return
        for key, expected in (("hidden_size", llm.hidden_size), ("vocab_size", llm.vocab_size)):
            if config.get(key) != expected:
                self.problems.append(
                    f"{self.bundle.path(llm.path)}/config.json: {key} is {config.get(key)}, manifest says {expected}"
                )
        weights = list(self.bundle.path(llm.path).glob("*.safetensors"))
        if not weights:
            self.problems.append(f"{self.bundle.path(llm.path)}: no *.safetensors weights")

    def _tokens(self) -> None:
        path = self._file(f"{self.m.llm.path}/tokenizer.json")
        if path is None:
            return
        tokenizer = Tokenizer.from_file(str(path))
        expected: list[tuple[str, int, str]] = [
            (self.m.prompt.media_start, self.m.prompt.media_start_id, "prompt.media_start"),
            (self.m.prompt.media_end, self.m.prompt.media_end_id, "prompt.media_end"),
        ]
        for modality, spec in self.m.outputs.items():
            for token, token_id in zip(spec.signal.tokens, spec.signal.token_ids):
                expected.append((token, token_id, f"outputs.{modality}.signal"))
        if len(self.m.stop.strings) == len(self.m.stop.token_ids):
            expected += [(s, i, "stop") for s, i in zip(self.m.stop.strings, self.m.stop.token_ids)]
        for token, token_id, where in expected:
            found = tokenizer.token_to_id(token)
            if found is None:
                self.problems.append(f"{path}: {where} token {token!r} is not in the tokenizer")
            elif found != token_id:
                self.problems.append(f"{path}: {where} token {token!r} has id {found}, manifest says {token_id}")
        for token_id in [self.m.prompt.bos_id, *self.m.stop.token_ids]:
            if not 0 <= token_id < self.m.llm.vocab_size:
                self.problems.append(f"{path}: token id {token_id} is outside the vocabulary ({self.m.llm.vocab_size})")

    def _loras(self) -> None:
        for lora in self.m.llm.loras:
            config = self._json(f"{lora.path}/adapter_config.json")
            self._file(f"{lora.path}/adapter_model.safetensors")
            if config is not None and config.get("r") != lora.rank:
                self.problems.append(
                    f"{self.bundle.path(lora.path)}/adapter_config.json: r is {config.get('r')}, manifest says {lora.rank}"
                )

    def _encoder(self) -> None:
        enc = self.m.encoder
        proj = self._shapes(enc.input_projection)
        if proj is not None:
            from services.modeling.input_projection_layout import input_projection_shapes

            # Every tensor the manifest's design has, with its shape; nothing else.
            expected = input_projection_shapes(enc.projection, enc.config.out_embed_dim, self.m.llm.hidden_size)
            for key, shape in expected.items():
                self._expect(enc.input_projection, proj, key, shape)
            extra = sorted(set(proj) - set(expected))
            if extra:
                self.problems.append(f"{self.bundle.path(enc.input_projection)}: tensors {extra[:5]} are not part of "
                                     f"a {enc.projection.kind} input projection")
        shapes = self._shapes(enc.weights)
        if shapes is None:
            return
        c = enc.config
        for trunk, dim, blocks in (
            ("vision", c.vision_embed_dim, c.vision_num_blocks),
            ("audio", c.audio_embed_dim, c.audio_num_blocks),
        ):
            self._expect(enc.weights, shapes, f"modality_heads.{trunk}.2.weight", (c.out_embed_dim, dim))
            found = {m.group(1) for k in shapes if (m := re.match(rf"modality_trunks\.{trunk}\.blocks\.(\d+)\.", k))}
            if len(found) != blocks:
                self.problems.append(
                    f"{self.bundle.path(enc.weights)}: {len(found)} {trunk} blocks, manifest config says {blocks}"
                )

    def _projector(self, modality: str, spec: ProjectorSpec, signal_count: int) -> None:
        shapes = self._shapes(spec.weights)
        if shapes is not None:
            self._expect(spec.weights, shapes, "fc.weight", (spec.hidden_dim, spec.in_dim))
            self._expect(spec.weights, shapes, "model.weight", (spec.out_dim, spec.hidden_dim))
            self._expect(spec.weights, shapes, "query_embs", (1, spec.num_queries, spec.hidden_dim))
            for part, layers in (("encoder", spec.num_encoder_layers), ("decoder", spec.num_decoder_layers)):
                found = {m.group(1) for k in shapes if (m := re.match(rf"tfm\.{part}\.layers\.(\d+)\.", k))}
                if len(found) != layers:
                    self.problems.append(
                        f"{self.bundle.path(spec.weights)}: {len(found)} {part} layers, manifest says {layers}"
                    )
            self._expect(spec.weights, shapes, "tfm.encoder.layers.0.linear1.weight", (spec.ffn_dim, spec.hidden_dim))
        rows = self._shapes(spec.signal_embeddings)
        if rows is not None:
            self._expect(spec.signal_embeddings, rows, "signal_input_embeddings", (signal_count, spec.in_dim))

    def _outputs(self) -> None:
        for modality, spec in self.m.outputs.items():
            self._projector(modality, spec.projector, len(spec.signal.token_ids))
            if spec.decoder.is_hub:
                continue
            index = self._json(f"{spec.decoder.source}/model_index.json")
            if index is None:
                continue
            where = self.bundle.path(spec.decoder.source)
            if index.get("_class_name") != _PIPELINE_CLASSES[spec.decoder.pipeline]:
                self.problems.append(
                    f"{where}/model_index.json: pipeline {index.get('_class_name')!r}, "
                    f"expected {_PIPELINE_CLASSES[spec.decoder.pipeline]!r}"
                )
            unet = self._json(f"{spec.decoder.source}/unet/config.json")
            if unet is None:
                continue
            # Conditioning must fit the decoder: cross-attention width for SD/ZeroScope, the class embedding
            # input for AudioLDM (whose prompt_embeds is one pooled CLAP vector).
            key = "projection_class_embeddings_input_dim" if modality == "audio" else "cross_attention_dim"
            if unet.get(key) != spec.projector.out_dim:
                self.problems.append(
                    f"{where}/unet/config.json: {key} is {unet.get(key)}, projector out_dim is {spec.projector.out_dim}"
                )
