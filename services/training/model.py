"""The trainable NExT-GPT over a bundle: the frozen LLM, the input projection, the output projectors and, per
stage, the signal tokens' embedding / lm_head rows and a LoRA adapter. One forward computes the reference's
losses: next-token NLL on the reply, and L2 between the projector's output at the signal positions (at the
bundle's hidden-state offset) and the decoder text encoder's embedding of the caption."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from services.bundle.loader import Bundle
from services.contracts.bundle_manifest import InputProjectionSpec, Modality
from services.encoder.model import load_input_projection
from services.modeling.input_projection import build_input_projection, project_media
from services.modeling.projector import OutputProjector
from services.training.examples import Encoded


@dataclass(frozen=True)
class LossWeights:
    nll: float = 1.0
    # The release weighs the video L2 twice in stage 3.
    l2: tuple[tuple[str, float], ...] = (("image", 1.0), ("video", 1.0), ("audio", 1.0))

    def l2_weight(self, modality: str) -> float:
        return dict(self.l2).get(modality, 1.0)


class NextGPTTrainable(nn.Module):
    def __init__(self, bundle: Bundle, input_projection: InputProjectionSpec | None = None) -> None:
        """``input_projection``: start a fresh input projection of this design instead of the bundle's (stage 1
        on a bundle whose projection was trained in the other design, or never trained)."""
        super().__init__()
        from transformers import AutoTokenizer, LlamaForCausalLM

        self.bundle, self.manifest = bundle, bundle.manifest
        llm_dir = str(bundle.path(self.manifest.llm.path))
        self.tokenizer = AutoTokenizer.from_pretrained(llm_dir)
        self.llm: nn.Module = LlamaForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
        encoder = self.manifest.encoder
        if input_projection is None or input_projection == encoder.projection:
            self.input_projection = load_input_projection(bundle)
        else:
            self.input_projection = build_input_projection(input_projection, encoder.config.out_embed_dim,
                                                           self.manifest.llm.hidden_size)
            encoder = encoder.model_copy(update={"projection": input_projection})
            self.manifest = self.manifest.model_copy(update={"encoder": encoder})
        self.projectors = nn.ModuleDict()
        for modality, spec in self.manifest.outputs.items():
            projector = OutputProjector(spec.projector)
            projector.load_state_dict(load_file(str(bundle.path(spec.projector.weights))), strict=True)
            self.projectors[modality] = projector
        self.signal_ids = {m: list(spec.signal.token_ids) for m, spec in self.manifest.outputs.items()}
        for p in self.parameters():
            p.requires_grad_(False)

    # -- what trains -------------------------------------------------------------------------------------
    def train_input_projection(self) -> None:
        self.input_projection.requires_grad_(True)

    def train_projectors(self) -> None:
        self.projectors.requires_grad_(True)

    def train_signal_rows(self) -> None:
        """Only the signal tokens' rows of embed_tokens and lm_head learn: the other rows get zero gradients
        (and with no weight decay on them, Adam leaves them exactly as they were)."""
        ids = torch.tensor(sorted(i for group in self.signal_ids.values() for i in group))
        for weight in (self.base_llm().get_input_embeddings().weight, self.base_llm().get_output_embeddings().weight):
            weight.requires_grad_(True)
            mask = torch.zeros(weight.shape[0], 1)
            mask[ids] = 1.0
            # The mask is made here, on the CPU; the weight may train on a GPU (accelerate moves the module later).
            weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))

    def add_lora(self, rank: int, alpha: int, dropout: float, targets: tuple[str, ...], name: str,
                 resume: bool = False) -> None:
        """A fresh adapter; or, with ``resume``, the bundle's own adapter of that name, trained on from where it
        is (fine-tuning a trained bundle further: a new task beside the ones it learnt)."""
        from peft import LoraConfig, PeftModel, get_peft_model

        if not resume:
            config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                                task_type="CAUSAL_LM")
            self.llm = get_peft_model(self.llm, config, adapter_name=name)
            return
        entry = next((e for e in self.manifest.llm.loras if e.name == name), None)
        if entry is None:
            names = [e.name for e in self.manifest.llm.loras]
            raise ValueError(f"the bundle has no LoRA {name!r} to resume; it has {names}")
        if entry.rank != rank:
            raise ValueError(f"the bundle's LoRA {name!r} has r={entry.rank}, not {rank}")
        # PEFT upcasts an fp16 adapter (a packed bundle's) to the base model's float32.
        self.llm = PeftModel.from_pretrained(self.llm, str(self.bundle.path(entry.path)), adapter_name=name,
                                             is_trainable=True)

    def base_llm(self) -> nn.Module:
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def trainable_summary(self) -> list[tuple[str, int]]:
        return [(n, p.numel()) for n, p in self.named_parameters() if p.requires_grad]

    # -- forward ---------------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def signal_rows(self, modality: str) -> torch.Tensor:
        return self.base_llm().get_input_embeddings().weight[self.signal_ids[modality]]

    def losses(self, batch: list[Encoded], media_table: torch.Tensor, weights: LossWeights) -> dict[str, torch.Tensor]:
        embed = self.base_llm().get_input_embeddings()
        device = embed.weight.device
        media_table = media_table.to(device)
        width = max(len(e.ids) for e in batch)
        hidden = embed.weight.shape[1]
        # Every example's media through the input projection at once: (items, tokens per item, hidden).
        media_rows = [r for e in batch for r in e.media_rows]
        projected = project_media(self.input_projection, media_table[media_rows].float()) if media_rows else None
        rows, labels, mask = [], [], []
        used = 0
        for e in batch:
            ids = torch.tensor(e.ids, device=device)
            x = embed(ids.clamp(min=0))
            slots = (ids == -1).nonzero().flatten()
            if len(slots):
                assert projected is not None
                vectors = projected[used:used + len(e.media_rows)].reshape(-1, hidden)
                used += len(e.media_rows)
                x = x.index_put((slots,), vectors)
            pad = width - len(e.ids)
            rows.append(F.pad(x, (0, 0, 0, pad)))
            labels.append(torch.tensor(e.labels + [-100] * pad))
            mask.append(torch.tensor([1] * len(e.ids) + [0] * pad))
        inputs = torch.stack(rows).reshape(len(batch), width, hidden)
        label_tensor = torch.stack(labels).to(device)
        out = self.llm(inputs_embeds=inputs, attention_mask=torch.stack(mask).to(device), output_hidden_states=True)
        logits = out.logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), label_tensor[:, 1:].reshape(-1), ignore_index=-100)
        losses = {"nll": weights.nll * nll}
        states = out.hidden_states[-1]
        offset = self.manifest.hidden_state_offset
        by_modality: dict[Modality, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for b, e in enumerate(batch):
            for start, target in e.groups:
                size = len(self.signal_ids[target.modality])
                h = states[b, start + offset:start + offset + size]
                by_modality.setdefault(target.modality, []).append((h, target.conditioning))
        for modality, pairs in by_modality.items():
            h = torch.stack([p[0] for p in pairs])
            target = torch.stack([p[1] for p in pairs]).to(device)
            pred = self.projectors[modality](h, self.signal_rows(modality))
            losses[f"l2_{modality}"] = weights.l2_weight(modality) * F.mse_loss(pred, target)
        return losses
