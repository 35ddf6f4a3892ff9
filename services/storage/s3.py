"""``ArtifactStore`` on any S3-compatible service (AWS, MinIO, SeaweedFS) through boto3."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from services.contracts.errors import ServiceUnavailableError
from services.contracts.settings import StorageSettings
from services.contracts.storage import (
    ArtifactMeta,
    ArtifactNotFoundError,
    ArtifactStore,
    check_key,
    check_metadata,
)

_MISSING = {"404", "NoSuchKey", "NotFound"}


log = logging.getLogger(__name__)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _reachable(bucket: str) -> Iterator[None]:
    """A read the store could not answer (no connection, a timeout after the client's retries, a 5xx such as
    SlowDown): ``ServiceUnavailableError``, which a download answers with a 503 to retry, not a 500. (Writes keep
    botocore's errors: a decoder worker counts those as transient and sends its job again.)"""
    try:
        yield
    except BotoCoreError as exc:
        log.warning("object store bucket %s: %s", bucket, exc)
        raise ServiceUnavailableError("the artifact store is unavailable; retry later",
                                      code="storage_unavailable", retry_after_s=5) from exc
    except ClientError as exc:
        if int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) < 500:
            raise
        log.warning("object store bucket %s: %s", bucket, exc)
        raise ServiceUnavailableError("the artifact store is unavailable; retry later",
                                      code="storage_unavailable", retry_after_s=5) from exc


class S3ArtifactStore(ArtifactStore):
    def __init__(self, client: Any, bucket: str, prefix: str, max_object_bytes: int) -> None:
        super().__init__(max_object_bytes)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> S3ArtifactStore:
        assert settings.s3_bucket is not None  # guaranteed by StorageSettings validation
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None,
            aws_secret_access_key=(
                settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
            ),
            # Path-style addressing works with every S3-compatible server; bounded retries and timeouts so a
            # dead store fails a request instead of hanging it.
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"},
                          connect_timeout=5, read_timeout=30, signature_version="s3v4"),
        )
        store = cls(client, settings.s3_bucket, settings.s3_prefix, settings.max_object_bytes)
        if settings.s3_create_bucket:
            store.ensure_bucket()
        return store

    def _object(self, key: str) -> str:
        return self.prefix + check_key(key)

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in _MISSING and _code(exc) != "NoSuchBucket":
                raise
            self.client.create_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, mime: str, *, metadata: dict[str, str] | None = None) -> ArtifactMeta:
        name = self._object(key)
        self._check_size(len(data))
        self.client.put_object(Bucket=self.bucket, Key=name, Body=data, ContentType=mime,
                               Metadata=check_metadata(metadata))
        return self.head(key)

    def head(self, key: str) -> ArtifactMeta:
        try:
            with _reachable(self.bucket):
                response = self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise ArtifactNotFoundError(key) from exc
            raise
        return ArtifactMeta(key=key, mime=response["ContentType"], size=response["ContentLength"],
                            created_at=response["LastModified"], metadata=response.get("Metadata", {}))

    def iter_bytes(self, key: str, start: int = 0, end: int | None = None,
                   chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        if end is not None and end <= start:
            return iter(())
        extra: dict[str, str] = {}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            with _reachable(self.bucket):
                response = self.client.get_object(Bucket=self.bucket, Key=self._object(key), **extra)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise ArtifactNotFoundError(key) from exc
            if _code(exc) == "InvalidRange":
                return iter(())
            raise
        return response["Body"].iter_chunks(chunk_size)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._object(key)}, ExpiresIn=expires_s,
        ))

    def sweep(self, kind: str, before: datetime) -> int:
        removed = 0
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=f"{self.prefix}{kind}/")
        for page in pages:
            old = [{"Key": o["Key"]} for o in page.get("Contents", []) if o["LastModified"] < before]
            for start in range(0, len(old), 1000):  # DeleteObjects takes 1000 keys at most
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": old[start:start + 1000],
                                                                      "Quiet": True})
            removed += len(old)
        return removed

    def expire_natively(self, kind: str, days: int) -> bool:
        """One lifecycle rule per kind, merged into the bucket's others (rules of other prefixes are kept)."""
        rule_id = f"nextgpt-{self.prefix}{kind}".replace("/", "-")[:255]
        try:
            try:
                rules = self.client.get_bucket_lifecycle_configuration(Bucket=self.bucket).get("Rules", [])
            except ClientError as exc:
                if _code(exc) != "NoSuchLifecycleConfiguration":
                    raise
                rules = []
            rules = [r for r in rules if r.get("ID") != rule_id] + [{
                "ID": rule_id, "Status": "Enabled", "Filter": {"Prefix": f"{self.prefix}{kind}/"},
                "Expiration": {"Days": days}}]
            self.client.put_bucket_lifecycle_configuration(Bucket=self.bucket,
                                                           LifecycleConfiguration={"Rules": rules})
        except (ClientError, BotoCoreError) as exc:
            log.info("bucket %s: no lifecycle rules (%s); expired %s objects are swept instead", self.bucket,
                     _code(exc) if isinstance(exc, ClientError) else exc, kind)
            return False
        return True

    def check_health(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise ServiceUnavailableError(
                f"object store bucket {self.bucket!r} is not reachable: {exc}", code="storage_unavailable"
            ) from exc
