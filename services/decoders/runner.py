"""One decode job, start to finish: idempotent by job id, cancellable between steps, with progress events.

The Celery task and the embedded worker pool both call ``DecoderRunner.run``; all logic lives here.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from safetensors.torch import load as load_safetensors

from services.contracts.bundle_manifest import BundleManifest
from services.contracts.decoders import ARTIFACT_FORMATS, CONDITIONING_TENSOR, ArtifactInfo, DecodeJob, JobEvent
from services.contracts.errors import NextGPTError
from services.contracts.storage import ArtifactNotFoundError, ArtifactStore
from services.jobs.book import JobBook, JobBookUnavailable
from services.decoders.media_out import mp4_bytes, png_bytes, wav_bytes
from services.decoders.pipelines import DecoderPipelines, Generated, resolve

log = logging.getLogger(__name__)


class PoisonJobError(Exception):
    """A job that can never succeed (bad conditioning, bad options): fail it, never retry it."""


class TransientJobError(Exception):
    """Storage or network trouble: the job may succeed when retried."""


class JobCancelled(Exception):
    pass


class JobTimeoutError(PoisonJobError):
    """Ran past the time limit; failed between two steps, without retry."""


class JobBusyError(TransientJobError):
    """Another delivery of the same job is running right now."""


class OutOfMemoryJobError(TransientJobError):
    """The decode ran out of (device) memory: the job may well fit later, or on another worker."""


class DeviceBrokenError(Exception):
    """The accelerator's context is broken (a device-side assert, an illegal access): nothing more can run in this
    process. Neither the job's fault nor transient here: the worker must exit so its supervisor restarts it, and
    the unacknowledged job goes to another worker."""


_BROKEN_DEVICE = ("device-side assert", "illegal memory access", "cuda error", "cublas_status", "cudnn_status",
                  "unspecified launch failure", "ecc error")


def classify(exc: BaseException, modality: str) -> Exception:
    """What an unexpected decoder exception means for the job and for the worker."""
    message = str(exc).lower()
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if (oom is not None and isinstance(exc, oom)) or isinstance(exc, MemoryError) or "out of memory" in message:
        return OutOfMemoryJobError(f"{modality} decoder ran out of memory: {exc}")
    if isinstance(exc, RuntimeError) and any(sign in message for sign in _BROKEN_DEVICE):
        return DeviceBrokenError(f"{modality} decoder broke the device: {exc}")
    return PoisonJobError(f"{modality} decoder failed: {type(exc).__name__}: {exc}")


class LeaseKeeper:
    """Keeps a job's lease for the job's whole life, not only between diffusion steps: a thread renews it every
    third of its TTL while the VAE decodes, the media encode and the artifact uploads. ``check()`` raises once the
    lease was lost (another delivery may run the job now), so this one stops rather than race it."""

    def __init__(self, book: JobBook, job_id: str, token: str, ttl_s: int) -> None:
        self.book, self.job_id, self.token, self.ttl_s = book, job_id, token, ttl_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"lease-{job_id[:8]}", daemon=True)

    def _keep(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl_s / 3)):
            try:
                if not self.book.renew(self.job_id, self.token, self.ttl_s):
                    self.lost.set()
                    return
            except JobBookUnavailable:
                continue  # the store is away for now; the lease lasts ttl_s, the next renewal may reach it

    def check(self) -> None:
        if self.lost.is_set():
            raise TransientJobError(f"job {self.job_id}: its lease was lost (another delivery may run it)")

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class DecoderRunner:
    def __init__(self, pipelines: DecoderPipelines, store: ArtifactStore, book: JobBook,
                 manifest: BundleManifest, time_limit_s: float = 900.0, lock_ttl_s: int = 120,
                 max_pixels: int = 2**24) -> None:
        self.pipelines, self.store, self.book, self.manifest = pipelines, store, book, manifest
        self.time_limit_s, self.lock_ttl_s, self.max_pixels = time_limit_s, lock_ttl_s, max_pixels

    def run(self, job: DecodeJob) -> ArtifactInfo | None:
        if self.book.is_cancelled(job.job_id):
            self.book.publish(JobEvent(job_id=job.job_id, type="cancelled"), job.modality)
            return None
        existing = self._existing(job)
        if existing is not None:
            # A re-delivered job whose artifact was already written: report it, write nothing.
            self.book.publish(JobEvent(job_id=job.job_id, type="completed", artifact=existing), job.modality)
            return existing
        token = self.book.claim(job.job_id, self.lock_ttl_s)
        if token is None:
            raise JobBusyError(f"job {job.job_id} is being run by another worker")
        lease = LeaseKeeper(self.book, job.job_id, token, self.lock_ttl_s)
        try:
            with lease:
                return self._run(job, lease)
        finally:
            self.book.release(job.job_id, token)

    def _existing(self, job: DecodeJob) -> ArtifactInfo | None:
        try:
            meta = self.store.head(job.artifact_key)
        except ArtifactNotFoundError:
            return None
        except Exception as exc:
            raise TransientJobError(f"artifact store: {exc}") from exc
        return ArtifactInfo(key=meta.key, modality=job.modality, mime=meta.mime, bytes=meta.size,
                            metadata=meta.metadata)

    def _run(self, job: DecodeJob, lease: LeaseKeeper) -> ArtifactInfo | None:
        started = time.perf_counter()
        self.book.publish(JobEvent(job_id=job.job_id, type="started"), job.modality)
        try:
            conditioning = self._conditioning(job)
            spec = self.manifest.outputs[job.modality]
            # A per-job default seed derived from the job id: a retried job reproduces the same output.
            opts = resolve(job.options, spec.decoder.defaults, seed=int(job.job_id[:15], 16))
            if job.modality in ("image", "video"):
                frames = (opts.frames or 1) if job.modality == "video" else 1
                pixels = (opts.height or 0) * (opts.width or 0) * frames
                if pixels > self.max_pixels:
                    # One oversized request must not take a GPU's memory (or its time) from everyone else.
                    raise PoisonJobError(f"{job.modality} of {opts.height}x{opts.width}"
                                         f"{f'x{opts.frames} frames' if job.modality == 'video' else ''} exceeds the "
                                         f"budget of {self.max_pixels} pixels per job")

            def on_step(step: int, total: int) -> None:
                if self.book.is_cancelled(job.job_id):
                    raise JobCancelled
                lease.check()
                if time.perf_counter() - started > self.time_limit_s:
                    raise JobTimeoutError(f"{job.modality} job ran past its time limit of {self.time_limit_s:.0f} s")
                self.book.publish(JobEvent(job_id=job.job_id, type="progress", step=step, total=total))

            generated = self.pipelines.generate(job.modality, conditioning, opts, on_step)
            data = self._encode(generated, opts.fps)
        except JobCancelled:
            self.book.publish(JobEvent(job_id=job.job_id, type="cancelled"), job.modality)
            return None
        except (PoisonJobError, TransientJobError):
            raise
        except JobBookUnavailable as exc:  # Redis away longer than the client retries: try the job again later
            raise TransientJobError(f"job book: {exc}") from exc
        except Exception as exc:
            kind = classify(exc, job.modality)
            if isinstance(kind, OutOfMemoryJobError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise kind from exc
        decode_s = time.perf_counter() - started
        metadata = {"seed": str(opts.seed), "steps": str(opts.steps), "decode-ms": str(int(decode_s * 1000)),
                    "job-id": job.job_id}
        if generated.audio is not None and generated.sample_rate:
            metadata["seconds"] = f"{len(generated.audio) / generated.sample_rate:.3f}"
        if generated.frames is not None and opts.fps:
            metadata["seconds"] = f"{len(generated.frames) / opts.fps:.3f}"
            metadata["frames"] = str(len(generated.frames))
        _, mime = ARTIFACT_FORMATS[job.modality]
        lease.check()  # never write an artifact under a lease another delivery now holds
        try:
            meta = self.store.put(job.artifact_key, data, mime, metadata=metadata)
        except NextGPTError:
            raise
        except Exception as exc:
            raise TransientJobError(f"artifact store: {exc}") from exc
        info = ArtifactInfo(key=meta.key, modality=job.modality, mime=mime, bytes=meta.size, metadata=metadata)
        self.book.publish(JobEvent(job_id=job.job_id, type="completed", artifact=info), job.modality)
        log.info("job %s (%s) done in %.2f s, %d bytes", job.job_id, job.modality, decode_s, meta.size)
        return info

    def _conditioning(self, job: DecodeJob) -> torch.Tensor:
        try:
            blob = self.store.read(job.conditioning_key)
        except ArtifactNotFoundError as exc:
            raise PoisonJobError(f"conditioning {job.conditioning_key} not found") from exc
        except Exception as exc:
            raise TransientJobError(f"artifact store: {exc}") from exc
        try:
            tensor = load_safetensors(blob)[CONDITIONING_TENSOR]
        except Exception as exc:
            raise PoisonJobError(f"conditioning {job.conditioning_key} is not a safetensors "
                                 f"'{CONDITIONING_TENSOR}' tensor ({exc})") from exc
        expected = self.manifest.outputs[job.modality].projector.output_shape
        if tuple(tensor.shape) == expected:
            tensor = tensor.unsqueeze(0)
        if tuple(tensor.shape) != (1, *expected):
            raise PoisonJobError(f"conditioning has shape {list(tensor.shape)}, {job.modality} needs {list(expected)}")
        if not torch.isfinite(tensor).all():
            raise PoisonJobError("conditioning contains NaN or infinite values")
        return tensor.float()

    @staticmethod
    def _encode(generated: Generated, fps: int | None) -> bytes:
        if generated.image is not None:
            return png_bytes(generated.image)
        if generated.frames is not None:
            return mp4_bytes(generated.frames, fps or 8)
        assert generated.audio is not None and generated.sample_rate is not None
        return wav_bytes(generated.audio, generated.sample_rate)
