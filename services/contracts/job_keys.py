"""Redis key names of a decode job, shared by the workers (writers) and the gateway (readers)."""

from __future__ import annotations

JOB_TTL_S = 24 * 3600
MAX_EVENTS = 1000


def status_key(prefix: str, job_id: str) -> str:
    return f"{prefix}job:{job_id}:status"


def events_key(prefix: str, job_id: str) -> str:
    return f"{prefix}job:{job_id}:events"


def cancel_key(prefix: str, job_id: str) -> str:
    return f"{prefix}job:{job_id}:cancel"


def lock_key(prefix: str, job_id: str) -> str:
    return f"{prefix}job:{job_id}:lock"


def job_key(prefix: str, job_id: str) -> str:
    """The job as submitted, so that a job whose worker died can be sent again by whoever notices."""
    return f"{prefix}job:{job_id}:job"


def lost_key(prefix: str, job_id: str) -> str:
    """How many times the job lost its worker mid-job."""
    return f"{prefix}job:{job_id}:lost"
