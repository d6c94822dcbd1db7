"""Artifact downloads: streamed, sha256-checked, written atomically (a partial file is never left)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from modelpress_cli.client import Client
from modelpress_cli.render import human_bytes

CHUNK = 1024 * 1024


class ChecksumMismatch(Exception):
    """A downloaded file does not match the sha256 the API listed for it."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str
    size_bytes: int
    skipped: bool  # already there with the right content


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_name(name: str) -> str:
    base = Path(name).name  # an artifact name is a plain file name; never follow a path in it
    if base in {"", ".", ".."}:
        raise ChecksumMismatch(f"refusing the artifact name {name!r}")
    return base


def download_one(client: Client, artifact: dict[str, Any], directory: Path) -> Downloaded:
    name = _safe_name(str(artifact.get("name") or artifact.get("id")))
    expected = str(artifact.get("sha256") or "").lower()
    path = directory / name
    if expected and path.is_file() and _sha256_of(path) == expected:
        return Downloaded(path, expected, path.stat().st_size, skipped=True)
    url = artifact.get("download_url") or f"/v1/jobs/{artifact.get('job_id')}/artifacts/{artifact.get('id')}"
    digest = hashlib.sha256()
    size = 0
    handle = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{name}.", suffix=".part", delete=False)
    try:
        with handle, client.stream(url) as response:
            header = response.headers.get("x-content-sha256", "").lower()
            for chunk in response.iter_bytes(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        actual = digest.hexdigest()
        for label, wanted in (("listed", expected), ("X-Content-SHA256", header)):
            if wanted and wanted != actual:
                raise ChecksumMismatch(f"{name}: sha256 {actual} does not match the {label} {wanted}; nothing written")
        if artifact.get("size_bytes") is not None and size != artifact["size_bytes"]:
            raise ChecksumMismatch(f"{name}: got {size} bytes, expected {artifact['size_bytes']}; nothing written")
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return Downloaded(path, actual, size, skipped=False)


def download_artifacts(client: Client, artifacts: list[dict[str, Any]], directory: Path,
                       log: Console | None = None) -> list[Downloaded]:
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    for artifact in artifacts:
        result = download_one(client, artifact, directory)
        if log is not None:
            state = "up to date" if result.skipped else "ok"
            log.print(f"{result.path}  {human_bytes(result.size_bytes)}  sha256 {result.sha256[:16]}  {state}",
                      markup=False)
        results.append(result)
    return results
