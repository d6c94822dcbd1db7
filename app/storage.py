"""Content-addressed blob storage behind one interface: the local disk (embedded default) or
S3-compatible object storage, so an API and workers on different machines share uploads and artifacts."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Protocol

from app.core.config import Settings, get_settings

CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"upload exceeds the limit of {limit} bytes")
        self.limit = limit


class EmptyUpload(Exception):
    pass


class BlobStore(Protocol):
    def put_stream(self, source: BinaryIO, max_bytes: int) -> tuple[str, int]: ...
    def put_file(self, path: Path) -> tuple[str, int]: ...
    def local_path(self, sha256: str) -> Path: ...
    def iter_bytes(self, sha256: str) -> Iterator[bytes]: ...
    def delete(self, sha256: str) -> None: ...


def check_sha(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("not a sha256 hex digest")
    return sha256


def _spool(source: BinaryIO, tmp_dir: Path, max_bytes: int) -> tuple[Path, str, int]:
    """Copy a stream to a temporary file chunk by chunk (memory stays at one chunk); return (path, sha, size)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise UploadTooLarge(max_bytes)
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise EmptyUpload()
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name), digest.hexdigest(), size


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LocalBlobStore:
    def __init__(self, root: Path, tmp_dir: Path):
        self.root = root
        self.tmp_dir = tmp_dir

    def local_path(self, sha256: str) -> Path:
        sha256 = check_sha(sha256)
        return self.root / sha256[:2] / sha256

    def put_stream(self, source: BinaryIO, max_bytes: int) -> tuple[str, int]:
        tmp, sha, size = _spool(source, self.tmp_dir, max_bytes)
        self._commit(tmp, sha)
        return sha, size

    def put_file(self, path: Path) -> tuple[str, int]:
        sha = _file_sha(path)
        if not self.local_path(sha).exists():
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="artifact-")
            os.close(fd)
            shutil.copyfile(path, name)
            self._commit(Path(name), sha)
        return sha, path.stat().st_size

    def _commit(self, tmp: Path, sha: str) -> None:
        target = self.local_path(sha)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Same content, same name: a concurrent writer just replaces identical bytes, atomically.
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def iter_bytes(self, sha256: str) -> Iterator[bytes]:
        with self.local_path(sha256).open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def delete(self, sha256: str) -> None:
        self.local_path(sha256).unlink(missing_ok=True)


class S3BlobStore:
    """Blobs as objects `<prefix>/<sha[:2]>/<sha>`; a local read-through cache serves workers' file reads."""

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None, cache_dir: Path, tmp_dir: Path):
        import boto3  # only deployments that use S3 need it loaded

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None)
        self.cache_dir, self.tmp_dir = cache_dir, tmp_dir

    def _key(self, sha256: str) -> str:
        sha256 = check_sha(sha256)
        return "/".join(p for p in (self.prefix, sha256[:2], sha256) if p)

    def _exists(self, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(sha256))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise

    def _upload(self, path: Path, sha: str) -> None:
        if not self._exists(sha):
            self.client.upload_file(str(path), self.bucket, self._key(sha))

    def put_stream(self, source: BinaryIO, max_bytes: int) -> tuple[str, int]:
        tmp, sha, size = _spool(source, self.tmp_dir, max_bytes)
        try:
            self._upload(tmp, sha)
        finally:
            tmp.unlink(missing_ok=True)
        return sha, size

    def put_file(self, path: Path) -> tuple[str, int]:
        sha = _file_sha(path)
        self._upload(path, sha)
        return sha, path.stat().st_size

    def local_path(self, sha256: str) -> Path:
        cached = self.cache_dir / check_sha(sha256)[:2] / sha256
        if not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="download-")
            os.close(fd)
            try:
                self.client.download_file(self.bucket, self._key(sha256), name)
                if _file_sha(Path(name)) != sha256:
                    raise OSError(f"object {self._key(sha256)} does not match its sha256")
                os.replace(name, cached)
            finally:
                Path(name).unlink(missing_ok=True)
        return cached

    def iter_bytes(self, sha256: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(sha256))["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(sha256))
        (self.cache_dir / sha256[:2] / sha256).unlink(missing_ok=True)


def make_blob_store(settings: Settings) -> BlobStore:
    url = settings.storage_url
    if not url:
        return LocalBlobStore(settings.blob_dir, settings.tmp_dir)
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return S3BlobStore(bucket, prefix, endpoint_url=settings.s3_endpoint_url,
                           cache_dir=settings.resolved_data_dir / "blob-cache", tmp_dir=settings.tmp_dir)
    raise ValueError(f"MODELPRESS_STORAGE_URL must be empty (local disk) or s3://bucket/prefix, not {url!r}")


@lru_cache
def get_blob_store() -> BlobStore:
    return make_blob_store(get_settings())
