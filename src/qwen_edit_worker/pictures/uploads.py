"""Where a job's pictures go: into the response as base64, or into an S3-compatible bucket.

Why this exists: RunPod refuses results over 20 MB, and big or many pictures are better served
from a bucket.  When the worker has bucket credentials (BUCKET_ENDPOINT_URL and keys, the names
RunPod's SDK reads) or the job carries RunPod's per-request `s3Config`, each picture is uploaded
from memory (no temporary files) and the output holds a presigned URL (valid 7 days) instead of
the data.  A failed upload fails the job with an error naming the endpoint and the reason: a job
never reports success with a picture missing.  Secrets and presigned URLs are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import RequestError, WorkerError

log = logging.getLogger(__name__)
PRESIGN_SECONDS = 7 * 24 * 3600
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
S3_CONFIG_KEYS = ("accessId", "accessSecret", "bucketName", "endpointUrl")


class UploadError(WorkerError):
    """An upload failed; `subject` names the bucket endpoint's host."""


@dataclass(frozen=True)
class Bucket:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    name: str  # empty: RunPod's default bucket name (the month, MM-YY)

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint_url).hostname or self.endpoint_url

    def creds(self) -> dict[str, str]:
        """The shape RunPod's SDK takes (runpod.serverless.utils.rp_upload.get_boto_client)."""
        return {"endpointUrl": self.endpoint_url, "accessId": self.access_key_id,
                "accessSecret": self.secret_access_key}


def job_bucket(job: Mapping[str, Any], default: Bucket | None) -> Bucket | None:
    """The job's own `s3Config` when it has one (validated), else the worker's bucket, else None."""
    config = job.get("s3Config")
    if config is None:
        return default
    if not isinstance(config, Mapping):
        raise RequestError("s3Config", f"must be an object with {', '.join(S3_CONFIG_KEYS)}")
    missing = [k for k in ("accessId", "accessSecret", "endpointUrl") if not isinstance(config.get(k), str)
               or not config.get(k)]
    if missing:
        raise RequestError("s3Config", f"missing or empty: {', '.join(missing)} (all of {', '.join(S3_CONFIG_KEYS)})")
    if not str(config["endpointUrl"]).lower().startswith(("http://", "https://")):
        raise RequestError("s3Config.endpointUrl", "must be an http(s) URL")
    name = str(config.get("bucketName") or "")
    return Bucket(config["endpointUrl"], config["accessId"], config["accessSecret"], name)


def upload(bucket: Bucket, key: str, data: bytes, fmt: str) -> str:
    """Upload `data` to `bucket` under `key`; return a presigned GET URL."""
    import time

    from runpod.serverless.utils.rp_upload import get_boto_client

    client, _ = get_boto_client(bucket.creds())
    if client is None:
        raise UploadError(bucket.host, "cannot create an S3 client (is boto3 installed?)")
    name = bucket.name or time.strftime("%m-%y")
    try:
        client.put_object(Bucket=name, Key=key, Body=data, ContentType=CONTENT_TYPES[fmt])
        return client.generate_presigned_url("get_object", Params={"Bucket": name, "Key": key},
                                             ExpiresIn=PRESIGN_SECONDS)
    except Exception as err:  # botocore's ClientError, connection and credential errors
        raise UploadError(f"bucket {name!r} at {bucket.host}", f"upload failed ({_reason(err)})") from None


def _reason(err: Exception) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(err).__name__
