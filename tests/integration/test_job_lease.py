"""The job lease on a real Redis: owned (only its holder renews or drops it), kept for the job's whole life by a
thread, lost leases stop the job; status transitions are read and written as one transaction."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from services.contracts.decoders import DecodeJob, JobEvent
from services.contracts.job_keys import lock_key
from services.contracts.storage import new_key
from services.decoders.runner import LeaseKeeper, TransientJobError
from services.jobs.book import RedisJobBook
from services.jobs.redis_clients import sync_redis
from tests.support.servers import RedisInfo


@pytest.fixture()
def book(redis_info: RedisInfo) -> Iterator[RedisJobBook]:
    client = sync_redis(redis_info.url)
    prefix = f"{redis_info.key_prefix}lease-{uuid.uuid4().hex[:6]}:"
    yield RedisJobBook(client, prefix)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def test_only_the_holder_renews_or_drops_the_lease(book: RedisJobBook) -> None:
    job = uuid.uuid4().hex
    mine = book.claim(job, ttl_s=30)
    assert mine is not None and book.claim(job, ttl_s=30) is None
    book.release(job, "someone-else")  # another worker's release must not free it
    assert book.claim(job, ttl_s=30) is None
    assert book.renew(job, "someone-else", 30) is False and book.renew(job, mine, 30) is True
    book.release(job, mine)
    assert book.claim(job, ttl_s=30) is not None


def test_the_keeper_holds_the_lease_between_steps_and_reports_its_loss(book: RedisJobBook) -> None:
    job = uuid.uuid4().hex
    token = book.claim(job, ttl_s=2)
    assert token is not None
    with LeaseKeeper(book, job, token, ttl_s=2) as lease:
        time.sleep(4.5)  # longer than the TTL, with no step to renew it: a VAE decode, an upload
        assert book.r.get(lock_key(book.prefix, job)).decode() == token
        lease.check()
        book.r.set(lock_key(book.prefix, job), "another-delivery")  # the lease taken over
        deadline = time.monotonic() + 5
        while not lease.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(TransientJobError, match="lease was lost"):
            lease.check()


def test_concurrent_publishers_never_reopen_a_finished_job(book: RedisJobBook) -> None:
    job = uuid.uuid4().hex
    book.publish(JobEvent(job_id=job, type="queued"), "image")
    book.publish(JobEvent(job_id=job, type="started"))
    stop = threading.Event()

    def progress() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            book.publish(JobEvent(job_id=job, type="progress", step=step, total=10_000))

    threads = [threading.Thread(target=progress) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    book.publish(JobEvent(job_id=job, type="cancelled"))
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert book.status(job).state == "cancelled"


def test_a_running_job_is_queued_again_only_once_its_lease_is_gone_and_it_fell_silent(book: RedisJobBook) -> None:
    job = decode_job_stub()
    book.keep(job)
    book.publish(JobEvent(job_id=job.job_id, type="queued", owner="me"), "image")
    assert book.requeue_if_lost(job.job_id, 0.0) is None  # queued: its wait is another bound's business
    token = book.claim(job.job_id, ttl_s=30)
    assert token is not None
    book.publish(JobEvent(job_id=job.job_id, type="progress", step=3, total=10), "image")
    assert book.requeue_if_lost(job.job_id, 0.0) is None  # its worker holds the lease: alive, however slow
    book.release(job.job_id, token)
    assert book.requeue_if_lost(job.job_id, 60.0) is None  # no lease, but it reported a moment ago
    assert book.requeue_if_lost(job.job_id, 0.0) == ("requeued", job)  # no lease and silent: its worker is gone
    status = book.status(job.job_id)
    assert status is not None and (status.state, status.step, status.owner) == ("queued", 0, "me")
    assert book.requeue_if_lost(job.job_id, 0.0) is None  # no longer running: a second caller sends nothing
    book.publish(JobEvent(job_id=job.job_id, type="started"), "image")
    assert book.requeue_if_lost(job.job_id, 0.0, max_lost=2) == ("requeued", job)  # its second worker died too
    book.publish(JobEvent(job_id=job.job_id, type="started"), "image")
    # A job whose every worker dies may be what kills them: the third time, it fails instead of taking the next.
    assert book.requeue_if_lost(job.job_id, 0.0, max_lost=2) == ("failed", job)
    status = book.status(job.job_id)
    assert status is not None and status.state == "failed" and (status.error or "").startswith("worker_lost: ")
    assert book.is_cancelled(job.job_id)  # Celery's own redelivery of it, later, does not run it either
    book.publish(JobEvent(job_id=job.job_id, type="started"), "image")  # a late event does not reopen it
    assert book.requeue_if_lost(job.job_id, 0.0) is None  # finished jobs stay finished
    other = decode_job_stub()  # running, no lease, but never kept (submitted by an older gateway): left alone
    book.publish(JobEvent(job_id=other.job_id, type="started"), "image")
    assert book.requeue_if_lost(other.job_id, 0.0) is None


def decode_job_stub() -> DecodeJob:
    job_id = uuid.uuid4().hex
    return DecodeJob(job_id=job_id, modality="image", conditioning_key=new_key("conditioning", ".pt"),
                     artifact_key=new_key("image", ".png", job_id), owner="me")
