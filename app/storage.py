"""Content-addressed blob store on the local disk: streamed writes, size caps, atomic renames."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"upload exceeds the limit of {limit} bytes")
        self.limit = limit


class EmptyUpload(Exception):
    pass


class BlobStore:
    def __init__(self, root: Path, tmp_dir: Path):
        self.root = root
        self.tmp_dir = tmp_dir

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def put_stream(self, source: BinaryIO, max_bytes: int) -> tuple[str, int]:
        """Copy a stream into the store chunk by chunk; return (sha256, size). Memory stays at one chunk."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-")
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
            sha = digest.hexdigest()
            self._commit(Path(tmp_name), sha)
            return sha, size
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    def put_file(self, path: Path) -> tuple[str, int]:
        """Copy a finished file (e.g. a worker's artifact) into the store."""
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        sha = digest.hexdigest()
        if not self.path(sha).exists():
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix="artifact-")
            os.close(fd)
            try:
                shutil.copyfile(path, tmp_name)
                self._commit(Path(tmp_name), sha)
            finally:
                Path(tmp_name).unlink(missing_ok=True)
        return sha, path.stat().st_size

    def _commit(self, tmp: Path, sha: str) -> None:
        target = self.path(sha)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Same content, same name: a second writer simply replaces identical bytes.
        os.replace(tmp, target)

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
