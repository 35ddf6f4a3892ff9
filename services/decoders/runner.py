"""One decode job, start to finish: idempotent by job id, cancellable between steps, with progress events.

The Celery task and the embedded worker pool both call ``DecoderRunner.run`` / ``run_batch``; all logic lives here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors

from services.contracts.bundle_manifest import BundleManifest
from services.contracts.decoders import (
    ARTIFACT_FORMATS, CONDITIONING_TENSOR, ArtifactInfo, DecodeJob, JobEvent, decode_pixels, describe_size,
)
from services.contracts.errors import NextGPTError, ServiceUnavailableError
from services.contracts.storage import ArtifactNotFoundError, ArtifactStore
from services.jobs.book import JobBook, JobBookUnavailable
from services.decoders.media_out import mp4_bytes, png_bytes, wav_bytes
from services.decoders.metrics import DecoderMetrics
from services.decoders.pipelines import BatchGenerator, CallTimeLimitError, Generated, ResolvedOptions, resolve

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


# CPU allocations that fail raise rather than wake the OOM killer when one request asks for more than the machine
# could ever give ("can't allocate memory"): as transient for the job as a CUDA out-of-memory.
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")
_BROKEN_DEVICE = ("device-side assert", "illegal memory access", "cuda error", "cublas_status", "cudnn_status",
                  "unspecified launch failure", "ecc error")


def classify(exc: BaseException, modality: str) -> Exception:
    """What an unexpected decoder exception means for the job and for the worker."""
    message = str(exc).lower()
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if (oom is not None and isinstance(exc, oom)) or isinstance(exc, MemoryError) \
            or any(sign in message for sign in _OUT_OF_MEMORY):
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


Outcome = ArtifactInfo | None | Exception  # the artifact; None: cancelled; an exception: how the job failed


def _outcome_label(outcome: Outcome) -> str:
    if outcome is None:
        return "cancelled"
    if isinstance(outcome, TransientJobError):
        return "transient"  # the pool tries it again (or fails it after its retries)
    return "failed" if isinstance(outcome, Exception) else "completed"


@dataclass
class _Running:
    """A job that passed its checks and holds its lease, ready for the pipeline."""

    job: DecodeJob
    lease: LeaseKeeper
    conditioning: torch.Tensor
    opts: ResolvedOptions
    outcome: Outcome | _Pending = field(default_factory=lambda: PENDING)


class _Pending:
    pass


PENDING = _Pending()


class DecoderRunner:
    def __init__(self, pipelines: BatchGenerator, store: ArtifactStore, book: JobBook,
                 manifest: BundleManifest, time_limit_s: float = 900.0, lock_ttl_s: int = 120,
                 max_pixels: int = 2**21, metrics: DecoderMetrics | None = None) -> None:
        self.pipelines, self.store, self.book, self.manifest = pipelines, store, book, manifest
        self.time_limit_s, self.lock_ttl_s, self.max_pixels = time_limit_s, lock_ttl_s, max_pixels
        self.metrics = metrics

    def run(self, job: DecodeJob) -> ArtifactInfo | None:
        outcome = self.run_batch([job])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def batch_key(self, job: DecodeJob) -> tuple[object, ...]:
        """Jobs with equal keys can share one pipeline call: same modality, steps, guidance and size."""
        opts = resolve(job.options, self.manifest.outputs[job.modality].decoder.defaults, seed=0)
        return (job.modality, opts.steps, opts.guidance_scale, opts.height, opts.width, opts.frames, opts.seconds)

    def batch_room(self, key: tuple[object, ...]) -> int:
        """How many jobs of this key fit one call: a batch's memory is its items' together, so it stays within one
        job's pixel budget (bigger jobs go alone)."""
        pixels = decode_pixels(key[0], *key[3:6])  # type: ignore[arg-type]
        return max(1, self.max_pixels // pixels) if pixels else 1 << 30

    def run_batch(self, jobs: list[DecodeJob]) -> list[Outcome]:
        """Each job's outcome, in order. Jobs of equal ``batch_key`` run as one pipeline call; everything else
        (checks, lease, cancellation, progress, encoding, upload, failure) stays per job: one bad job never fails
        its batch-mates."""
        outcomes: dict[int, Outcome] = {}
        running: dict[int, _Running] = {}
        with contextlib.ExitStack() as leases:
            for i, job in enumerate(jobs):
                try:
                    ready = self._start(job, leases)
                except Exception as exc:
                    outcomes[i] = exc if isinstance(exc, (PoisonJobError, TransientJobError, DeviceBrokenError)) \
                        else self._classify(exc, job)
                    continue
                if isinstance(ready, _Running):
                    running[i] = ready
                else:
                    outcomes[i] = ready
            groups: dict[tuple[object, ...], list[_Running]] = {}
            for item in running.values():
                groups.setdefault(self.batch_key(item.job), []).append(item)
            for key, group in groups.items():
                room = self.batch_room(key)
                for start in range(0, len(group), room):
                    self._generate(group[start:start + room])
            for i, item in running.items():
                assert not isinstance(item.outcome, _Pending)
                outcomes[i] = item.outcome
        ordered = [outcomes[i] for i in range(len(jobs))]
        if self.metrics is not None:
            for job, outcome in zip(jobs, ordered, strict=True):
                self.metrics.jobs.labels(job.modality, _outcome_label(outcome)).inc()
        return ordered

    def _start(self, job: DecodeJob, leases: contextlib.ExitStack) -> _Running | ArtifactInfo | None:
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
        leases.callback(self.book.release, job.job_id, token)
        lease = leases.enter_context(LeaseKeeper(self.book, job.job_id, token, self.lock_ttl_s))
        self.book.publish(JobEvent(job_id=job.job_id, type="started"), job.modality)
        conditioning = self._conditioning(job)
        spec = self.manifest.outputs[job.modality]
        # A per-job default seed derived from the job id: a retried job reproduces the same output.
        opts = resolve(job.options, spec.decoder.defaults, seed=int(job.job_id[:15], 16))
        if decode_pixels(job.modality, opts.height, opts.width, opts.frames) > self.max_pixels:
            # One oversized request must not take a machine's memory (or its time) from everyone else.
            raise PoisonJobError(f"{describe_size(job.modality, opts.height, opts.width, opts.frames)} exceeds the "
                                 f"budget of {self.max_pixels} pixels per job")
        return _Running(job, lease, conditioning, opts)

    def _generate(self, group: list[_Running]) -> None:
        """One pipeline call for the group; alone again, one by one, if the shared call fails."""
        started = time.perf_counter()
        modality, opts = group[0].job.modality, group[0].opts
        first: list[float] = []  # the first step reported, and the seconds from the call's start to its end
        last = [0, 0.0, float(opts.steps)]  # the last step reported, its end (seconds from the start), the total

        def wanted() -> list[_Running]:
            """The group's jobs still wanted; JobCancelled when none is (cancelled, or its lease lost)."""
            for item in group:
                if not isinstance(item.outcome, _Pending):
                    continue
                if self.book.is_cancelled(item.job.job_id):
                    # Its rows finish with the batch (a pipeline call cannot drop them); its result is dropped.
                    item.outcome = None
                    self.book.publish(JobEvent(job_id=item.job.job_id, type="cancelled"), modality)
                elif item.lease.lost.is_set():
                    item.outcome = TransientJobError(f"job {item.job.job_id}: its lease was lost")
            live = [item for item in group if isinstance(item.outcome, _Pending)]
            if not live:
                raise JobCancelled
            return live

        # The pixel budget bounds memory, not time: on a CPU a size within it can take hours (the world bundle's
        # 1024x1024 picture: about 3 min a step). Once the steps so far show that the call cannot end within the
        # limit, it ends now, not at the limit, so that it does not hold the worker (and the jobs queued behind
        # it) for the whole limit. The first step also holds the call's set-up and a first call's warm-up, so from
        # it alone only a call of twice the limit is ended; later, the pace of the steps after the first tells.
        def judge(step: int, elapsed: float, total: float, so_far: str) -> None:
            """JobTimeoutError when the call's whole time, as its steps show it had ``step`` ended ``elapsed`` s
            after the start, is past its bound; ``so_far`` tells the client what showed it."""
            if step >= total:
                return
            if not first or step == first[0]:
                projected, bound = elapsed / step * total, 2 * self.time_limit_s
            else:
                pace = (elapsed - first[1]) / (step - first[0])
                projected, bound = elapsed + pace * (total - step), self.time_limit_s
            if projected > bound:
                raise JobTimeoutError(
                    f"{modality} job would run past its time limit of {self.time_limit_s:.0f} s: {so_far} "
                    f"{projected:.0f} s for all; ask for fewer steps or a smaller size")

        def check() -> None:
            """Asked while a step runs (by a generator that can stop one): cancels, and the step under way. It ends
            later than now, so the projection as if it ended now is the least the call will take: past the bound
            already, the call ends without waiting for the step (minutes, on a CPU near the pixel budget)."""
            wanted()
            step, elapsed, total = last[0] + 1, time.perf_counter() - started, last[2]
            judge(step, elapsed, total, f"step {step} of {total:.0f} had run {elapsed - last[1]:.1f} s and was not "
                                        f"done, at least")

        def on_step(step: int, total: int) -> None:
            live = wanted()
            elapsed = time.perf_counter() - started
            if elapsed > self.time_limit_s:
                raise JobTimeoutError(f"{modality} job ran past its time limit of {self.time_limit_s:.0f} s")
            if not first:
                first.extend((step, elapsed))
            judge(step, elapsed, total, f"{step} of {total} steps took {elapsed:.1f} s, about")
            last[:] = [step, elapsed, float(total)]
            for item in live:
                self.book.publish(JobEvent(job_id=item.job.job_id, type="progress", step=step, total=total))

        try:
            generated = self.pipelines.generate_batch(
                modality, torch.cat([item.conditioning for item in group]),
                [item.opts.seed for item in group], opts, on_step, check)
        except JobCancelled:
            return
        except Exception as exc:
            self._failed(group, exc)
            return
        decode_s = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.batch_size.labels(modality).observe(len(group))
            self.metrics.call_seconds.labels(modality).observe(decode_s)
        for item, result in zip(group, generated, strict=True):
            if isinstance(item.outcome, _Pending):
                try:
                    item.outcome = self._finish(item, result, decode_s, len(group))
                except Exception as exc:
                    item.outcome = exc if isinstance(exc, (PoisonJobError, TransientJobError)) \
                        else self._classify(exc, item.job)

    def _failed(self, group: list[_Running], exc: Exception) -> None:
        """A shared call raised ``exc``: its jobs still pending fail with what it means, or, where each alone may
        do (a batch that failed, or was too slow), run again one by one."""
        modality = group[0].job.modality
        if isinstance(exc, CallTimeLimitError):  # a step outran the limit: alone, each would take as long again
            outcome: Exception = JobTimeoutError(f"{modality} job: {exc}")
            alone = False
        elif isinstance(exc, JobTimeoutError):  # together too slow; alone, the pace shows within a step or two
            outcome, alone = exc, True
        elif isinstance(exc, JobBookUnavailable):  # Redis away longer than the client retries: try them later
            outcome, alone = TransientJobError(f"job book: {exc}"), False
        else:
            outcome = self._classify(exc, group[0].job)
            alone = not isinstance(outcome, DeviceBrokenError)
        pending = [item for item in group if isinstance(item.outcome, _Pending)]
        if alone and len(group) > 1:
            log.warning("a batch of %d %s jobs %s (%s); running them one by one", len(group), modality,
                        "is too slow" if isinstance(exc, JobTimeoutError) else "failed", exc)
            for item in pending:
                self._generate([item])
            return
        for item in pending:
            item.outcome = outcome

    def _finish(self, item: _Running, generated: Generated, decode_s: float, batch: int) -> ArtifactInfo:
        job, opts = item.job, item.opts
        data = self._encode(generated, opts.fps)
        metadata = {"seed": str(opts.seed), "steps": str(opts.steps), "decode-ms": str(int(decode_s * 1000)),
                    "batch": str(batch), "job-id": job.job_id}
        if generated.audio is not None and generated.sample_rate:
            metadata["seconds"] = f"{len(generated.audio) / generated.sample_rate:.3f}"
        if generated.frames is not None and opts.fps:
            metadata["seconds"] = f"{len(generated.frames) / opts.fps:.3f}"
            metadata["frames"] = str(len(generated.frames))
        _, mime = ARTIFACT_FORMATS[job.modality]
        item.lease.check()  # never write an artifact under a lease another delivery now holds
        try:
            meta = self.store.put(job.artifact_key, data, mime, metadata=metadata)
        except ServiceUnavailableError as exc:  # the store unreachable (the S3 store's head after the write)
            raise TransientJobError(f"artifact store: {exc}") from exc
        except NextGPTError:
            raise
        except Exception as exc:
            raise TransientJobError(f"artifact store: {exc}") from exc
        info = ArtifactInfo(key=meta.key, modality=job.modality, mime=mime, bytes=meta.size, metadata=metadata)
        self.book.publish(JobEvent(job_id=job.job_id, type="completed", artifact=info), job.modality)
        log.info("job %s (%s) done in %.2f s (batch of %d), %d bytes", job.job_id, job.modality, decode_s, batch,
                 meta.size)
        return info

    @staticmethod
    def _classify(exc: Exception, job: DecodeJob) -> Exception:
        if isinstance(exc, JobBookUnavailable):
            return TransientJobError(f"job book: {exc}")
        kind = classify(exc, job.modality)
        if isinstance(kind, OutOfMemoryJobError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        kind.__cause__ = exc
        return kind

    def _existing(self, job: DecodeJob) -> ArtifactInfo | None:
        try:
            meta = self.store.head(job.artifact_key)
        except ArtifactNotFoundError:
            return None
        except Exception as exc:
            raise TransientJobError(f"artifact store: {exc}") from exc
        return ArtifactInfo(key=meta.key, modality=job.modality, mime=meta.mime, bytes=meta.size,
                            metadata=meta.metadata)

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
