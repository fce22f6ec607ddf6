"""``iq_ref`` claim checks: fetch ``s3://bucket/key.npy`` with boto3 (MinIO in compose, moto in tests).

boto3/botocore errors are translated here: a missing object is the client's fault
(:class:`PayloadError` ``iq_ref_unavailable``); an unreachable store is :class:`TransientError`.
"""

from __future__ import annotations

from urllib.parse import urlparse

from ..errors import PayloadCode, PayloadError, TransientError

__all__ = ["S3Fetcher"]


class S3Fetcher:
    """Callable ``url -> bytes`` for :class:`~heimdall_inference.payload.PayloadDecoder`."""

    def __init__(self, endpoint_url: str | None = None, *, max_bytes: int = 64 * 1024 * 1024) -> None:
        import boto3
        from botocore.config import Config

        self.client = boto3.client("s3", endpoint_url=endpoint_url or None,
                                   config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 2}))
        self.max_bytes = max_bytes

    def __call__(self, url: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

        parsed = urlparse(url)
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
            if head["ContentLength"] > self.max_bytes:
                raise PayloadError(PayloadCode.PAYLOAD_TOO_LARGE, f"{url} is {head['ContentLength']} bytes")
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NoSuchBucket", "403", "AccessDenied"):
                raise PayloadError(PayloadCode.IQ_REF_UNAVAILABLE, f"{url}: {code}") from exc
            raise TransientError(f"object store error for {url}: {code}") from exc
        except ParamValidationError as exc:  # a request boto3 refuses to send: the URL is the producer's to fix
            raise PayloadError(PayloadCode.INVALID_FIELD, f"{url}: {exc}"[:300]) from exc
        except BotoCoreError as exc:
            raise TransientError(f"object store unreachable for {url}: {exc}") from exc
