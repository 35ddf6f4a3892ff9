"""Celery configuration shared by the workers and the gateway's queue client (plain data: no Celery import)."""

from __future__ import annotations

from typing import Any

from services.contracts.settings import Settings

DECODE_TASK = "nextgpt.decode"
QUEUES = ("image", "video", "audio")


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {
        "visibility_timeout": settings.decoders.visibility_timeout_s,
        # Every broker key under our prefix: several deployments (or test runs) can share one Redis.
        "global_keyprefix": settings.redis.key_prefix,
    }
    return {
        "broker_url": settings.redis.url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # Results go to Redis too (the artifact info, for Celery tooling); the gateway reads the job book.
        "result_backend": settings.redis.url,
        "result_backend_transport_options": {"global_keyprefix": settings.redis.key_prefix},
        "result_expires": 24 * 3600,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": QUEUES[0],
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
