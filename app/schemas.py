"""Request and response models: one family per resource."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, AnyHttpUrl, BaseModel, ConfigDict, Field

from jobspec import PipelineSpec

T = TypeVar("T")


def _assume_utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stored time is UTC, so say so on the wire.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


UtcDatetime = Annotated[datetime, AfterValidator(_assume_utc)]


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | list[Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="Pass as `cursor` to get the next page; null on the last page.")


class _Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ModelRead(_Read):
    id: str
    name: str
    filename: str
    sha256: str
    size_bytes: int
    status: str = Field(description="validating | ready | invalid")
    format: str | None = Field(None, description="safetensors | state_dict | export")
    architecture: str | None
    arch_kwargs: dict[str, Any]
    param_count: int | None
    input_shape: list[int] | None
    num_outputs: int | None
    error: dict[str, Any] | None
    created_at: UtcDatetime


class DatasetRead(_Read):
    id: str
    name: str
    filename: str
    sha256: str
    size_bytes: int
    status: str
    format: str | None = Field(None, description="imagefolder | tensors")
    num_samples: int | None
    classes: list[str] | None
    input_shape: list[int] | None
    error: dict[str, Any] | None
    created_at: UtcDatetime


class JobCreate(PipelineSpec):
    """A job: which model (and dataset) to compress, and the ordered steps."""

    model_id: str = Field(min_length=1, max_length=64)
    dataset_id: str | None = Field(None, min_length=1, max_length=64)
    callback_url: AnyHttpUrl | None = Field(
        None, description="POSTed the job (HMAC-SHA256 signed, see GET /v1/tenant) when it reaches a final state."
    )

    def pipeline(self) -> PipelineSpec:
        return PipelineSpec.model_validate(self.model_dump(exclude={"model_id", "dataset_id", "callback_url"}))


class JobRead(_Read):
    id: str
    model_id: str
    dataset_id: str | None
    status: str = Field(description="queued | running | succeeded | failed | canceled")
    cancel_requested: bool
    progress: float = Field(description="0-100")
    current_step: int | None
    current_step_kind: str | None
    message: str | None
    error: dict[str, Any] | None
    attempts: int
    spec: dict[str, Any]
    callback_url: str | None
    queue: str = Field(description="modelpress.jobs (CPU workers) or modelpress.jobs.gpu")
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class JobEventRead(_Read):
    id: int
    at: UtcDatetime
    type: str
    step: int | None
    kind: str | None
    status: str | None
    message: str | None
    data: dict[str, Any] | None


class ArtifactRead(_Read):
    id: str
    job_id: str
    name: str
    kind: str
    format: str
    description: str
    sha256: str
    size_bytes: int
    created_at: UtcDatetime
    download_url: str = ""


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    max_concurrent_jobs: int | None = Field(None, ge=1, le=10000, description="Default: MODELPRESS_MAX_CONCURRENT_JOBS")


class TenantRead(_Read):
    id: str
    name: str
    max_concurrent_jobs: int | None
    created_at: UtcDatetime


class TenantSelf(TenantRead):
    webhook_secret: str = Field(description="Verifies X-ModelPress-Signature on webhook deliveries.")


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=200)


class ApiKeyRead(_Read):
    id: str
    tenant_id: str
    name: str
    prefix: str
    created_at: UtcDatetime
    revoked_at: UtcDatetime | None


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The API key. Shown once; only its hash is stored.")
