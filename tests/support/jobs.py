"""Decode jobs as the gateway sends them, for tests of the runner, the pools and the workers."""

from __future__ import annotations

import torch
from safetensors.torch import save

from services.contracts.bundle_manifest import Modality
from services.contracts.decoders import ARTIFACT_FORMATS, DecodeJob, DecodeOptions, new_job_id
from services.contracts.storage import ArtifactStore, new_key


def decode_job(store: ArtifactStore, conditioning: torch.Tensor, modality: Modality = "image",
               **options: object) -> DecodeJob:
    """A job for one item: ``conditioning`` (the item's, without a batch axis) put in ``store``, a fresh id."""
    blob = save({"conditioning": conditioning.unsqueeze(0).contiguous()})
    cond = store.put_new("conditioning", blob, "application/vnd.nextgpt.safetensors", suffix=".safetensors")
    job_id = new_job_id()
    return DecodeJob(job_id=job_id, modality=modality, conditioning_key=cond.key,
                     artifact_key=new_key(modality, ARTIFACT_FORMATS[modality][0], uid=job_id),
                     options=DecodeOptions(**options))
