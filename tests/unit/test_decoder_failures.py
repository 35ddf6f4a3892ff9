"""What an unexpected decoder exception means: out of memory is transient for the job (retry, maybe elsewhere), a
broken device stops the worker, anything else fails the job as poison."""

from __future__ import annotations

import pytest
import torch

from services.decoders.runner import (
    DeviceBrokenError, OutOfMemoryJobError, PoisonJobError, TransientJobError, classify,
)


@pytest.mark.parametrize(("exc", "kind"), [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), OutOfMemoryJobError),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 128097152000 bytes. Error code "
                  "12 (Cannot allocate memory)"), OutOfMemoryJobError),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: out of memory"),
     OutOfMemoryJobError),
    (MemoryError(), OutOfMemoryJobError),
    (RuntimeError("CUDA error: device-side assert triggered"), DeviceBrokenError),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), DeviceBrokenError),
    (ValueError("conditioning has shape [1, 77, 999]"), PoisonJobError),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), PoisonJobError),
])
def test_decoder_exceptions_are_classified(exc: BaseException, kind: type) -> None:
    got = classify(exc, "image")
    assert type(got) is kind
    assert isinstance(got, TransientJobError) == (kind is OutOfMemoryJobError)
    assert "image decoder" in str(got)
