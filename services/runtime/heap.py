"""A serving process's start-up objects (imported modules, the loaded model, the app) kept out of the cyclic
garbage collector's full collections.

A full (oldest-generation) collection walks every object the collector tracks, and a served process holds a couple
of hundred thousand from its imports and its model. Under load, the gateway's full collections ran every 9-20 s and
stopped its event loop for 83-114 ms each, collecting 0-10 objects; every stream in flight took that pause into its
next event (distributed stack, tiny bundle, 8 concurrent streams for 90 s, 2026-12-08). The objects loaded at start
live as long as the process, so once loading is done they are moved out of the collector's reach (``gc.freeze``),
and a full collection walks only what serving has made since: 9-36 ms under the same load (the slowest first
token did not fall reliably: it has other causes too). A process forked afterwards (the fork server's model children) shares those pages instead of
copying them on the collector's first walk."""

from __future__ import annotations

import gc
import logging

from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger(__name__)


def freeze_loaded() -> None:
    """Collects what loading left behind, then moves every object still alive out of the collector's scans. Call
    once a process has loaded what it serves; each call moves what is there at that moment."""
    gc.collect()
    gc.freeze()
    log.info("%d objects of start-up left out of the garbage collector's scans", gc.get_freeze_count())


def add_heap_metrics(registry: CollectorRegistry) -> None:
    Gauge("nextgpt_gc_frozen_objects", "Objects of start-up left out of the garbage collector's scans (0: not yet "
          "frozen, every full collection walks them)", registry=registry).set_function(gc.get_freeze_count)
