"""Imported by the fork server of ``services.runtime.children`` only (its preload), never by a serving process:
the modules every model child needs, so that each child starts with them imported.

The fork server also ignores SIGTERM: systemd and ``kill -- -PGID`` signal every process of the group, and the
fork server is the one that reports each child's exit to its parent. Gone, it would make a child that is still
finishing its call (a decoder child ignores SIGTERM so that a Celery worker's warm shutdown can end its batch)
look dead to its parent. It exits when its parent does (its pipe from the parent closes)."""

import signal

from services.runtime.heap import freeze_loaded
from services.runtime.library_noise import quiet_model_libraries

signal.signal(signal.SIGTERM, signal.SIG_IGN)
quiet_model_libraries()  # before transformers' import, which reads its progress-bar switch

# A module that cannot be imported here costs a child only its own import, which then reports the error where the
# child's parent sees it.
try:
    import torch  # noqa: F401
    from diffusers import AudioLDMPipeline, StableDiffusionPipeline, TextToVideoSDPipeline  # noqa: F401

    import services.bundle.loader  # noqa: F401
    import services.decoders.pipelines  # noqa: F401
    import services.llm.hf_backend  # noqa: F401
except Exception:  # noqa: BLE001
    pass

# Every child is forked from here: with the imports out of the collector's scans, a child's collections do not walk
# (and so copy) the pages it shares with the fork server.
freeze_loaded()
