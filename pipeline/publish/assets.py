"""Upsert's first part: the assets of the manifest, each uploaded to its content-addressed S3 key
unless that key exists already (then it holds the same bytes)."""
from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from pipeline.assets import Asset
from pipeline.aws import Clients, error_code, explained, is_not_found
from pipeline.settings import Settings

def publish_asset(clients: Clients, settings: Settings, asset: Asset) -> tuple[str, bool]:
    """Upload ``asset`` unless its content-addressed key exists; returns (report line, uploaded)."""
    bucket, key = settings.bucket, asset.key
    uri = asset.s3_uri
    with explained(f"checking {uri}", bucket=bucket):
        if _object_exists(clients, bucket, key):
            return f"asset {asset.name}: unchanged, {uri}", False
    extra: dict[str, Any] = {}
    if settings.kms_key_id:
        extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": settings.kms_key_id}
    with explained(f"uploading {uri}", bucket=bucket):
        clients.s3.put_object(
            Bucket=bucket, Key=key, Body=asset.data, ChecksumAlgorithm="SHA256",
            ContentType="application/gzip" if asset.filename.endswith(".tar.gz") else "application/zip",
            Metadata={"sha256": asset.sha256, "source": asset.source}, **extra,
        )
    return f"asset {asset.name}: uploaded {uri} ({len(asset.data) / 1024:.1f} KiB)", True


def _object_exists(clients: Clients, bucket: str, key: str) -> bool:
    """True when the key exists. A 403 counts as absent: without s3:ListBucket, S3 answers 403 for
    a missing key, and uploading the same content-addressed bytes again is harmless."""
    try:
        clients.s3.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as error:
        if is_not_found(error) or error_code(error) in ("403", "AccessDenied"):
            return False
        raise
