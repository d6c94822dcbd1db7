"""Jobs: submit, follow, cancel, collect artifacts."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api.deps import JobDep, QueueDep, SessionDep, SettingsDep, StoreDep, TenantDep
from app.db.models import Artifact, Job, Tenant
from app.errors import NotFound
from app.schemas import ArtifactRead, ErrorResponse, JobCreate, JobEventRead, JobRead, Page
from app.services import jobs as job_service
from app.services.idempotency import IdempotencyKey
from app.services.job_watch import event_stream, wait_for_change

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

StatusFilter = Literal["queued", "running", "succeeded", "failed", "canceled"]


@router.post(
    "",
    response_model=JobRead,
    status_code=202,
    responses={
        404: {"model": ErrorResponse, "description": "model_id or dataset_id does not exist"},
        409: {"model": ErrorResponse, "description": "the model or dataset is not ready"},
        422: {"model": ErrorResponse, "description": "invalid spec; `error.details` names the field"},
        429: {"model": ErrorResponse, "description": "the tenant's limit of queued + running jobs is reached"},
        503: {"model": ErrorResponse, "description": "queue unreachable; no job was created"},
    },
)
def submit_job(
    payload: JobCreate,
    response: Response,
    db: SessionDep,
    queue: QueueDep,
    settings: SettingsDep,
    principal: TenantDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> Job:
    """Queue a compression job. Poll the returned `Location` for its status.

    Send an `Idempotency-Key` header to make retries safe: the same key returns the same job.
    """
    idem = IdempotencyKey.of(tenant_id=principal.tenant_id, key=idempotency_key, scope="jobs",
                             request=payload.model_dump(mode="json"))
    tenant = db.get(Tenant, principal.tenant_id)
    job = job_service.create(db=db, queue=queue, tenant=tenant, settings=settings, payload=payload, idem=idem)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.get("", response_model=Page[JobRead])
def list_jobs(
    db: SessionDep,
    principal: TenantDep,
    status: StatusFilter | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Jobs, newest first; follow `next_cursor` for more."""
    items, next_cursor = job_service.list_jobs(db=db, tenant_id=principal.tenant_id, status=status, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": next_cursor}


@router.get("/{job_id}", response_model=JobRead, responses={404: {"model": ErrorResponse}})
async def get_job(
    job: JobDep,
    db: SessionDep,
    wait: Annotated[float, Query(ge=0, le=60, description="Long-poll: answer when the job changes or after this many seconds")] = 0,
) -> Job:
    """A job's status, progress and current step. With `wait`, the answer waits for a change."""
    if wait:
        job = await wait_for_change(db=db, job=job, timeout_s=wait)
    return job


@router.post(
    "/{job_id}/cancel",
    response_model=JobRead,
    status_code=202,
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse, "description": "job already finished"}},
)
def cancel_job(job: JobDep, db: SessionDep) -> Job:
    """Cancel a queued job at once, or ask a running one to stop between batches."""
    return job_service.cancel(db=db, job=job)


@router.get(
    "/{job_id}/events",
    response_model=list[JobEventRead],
    responses={
        200: {"content": {"text/event-stream": {"description": "with Accept: text/event-stream: live events"}}},
        404: {"model": ErrorResponse},
    },
)
def list_events(
    job: JobDep,
    request: Request,
    after: Annotated[int, Query(ge=0, description="Only events with a larger id")] = 0,
    last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0)] = None,
) -> Any:
    """The job's timeline: status changes, step starts and ends.

    With `Accept: text/event-stream` the answer is a Server-Sent Events stream: the stored events,
    then each new one as it happens and `progress` updates, ending after the final status.
    """
    if "text/event-stream" in request.headers.get("accept", ""):
        start = max(after, last_event_id or 0)
        return StreamingResponse(event_stream(job.id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return [event for event in job.events if event.id > after]


def _artifact_read(artifact: Artifact) -> ArtifactRead:
    read = ArtifactRead.model_validate(artifact)
    read.download_url = f"/v1/jobs/{artifact.job_id}/artifacts/{artifact.id}"
    return read


@router.get("/{job_id}/artifacts", response_model=list[ArtifactRead], responses={404: {"model": ErrorResponse}})
def list_artifacts(job: JobDep) -> list[ArtifactRead]:
    """Files produced by a succeeded job: the compressed model in several formats and the report."""
    return [_artifact_read(a) for a in job.artifacts]


@router.get(
    "/{job_id}/artifacts/{artifact_id}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 404: {"model": ErrorResponse}},
)
def download_artifact(
    job: JobDep, artifact_id: Annotated[str, Path(min_length=1, max_length=255)], store: StoreDep
) -> StreamingResponse:
    """Download an artifact by its id or its name (e.g. `model.safetensors`)."""
    # By id, or by file name: `.../artifacts/model.safetensors` is easier to script.
    artifact = next((a for a in job.artifacts if artifact_id in (a.id, a.name)), None)
    if artifact is None:
        raise NotFound(f"artifact {artifact_id} not found in job {job.id}", {"id": artifact_id})
    return StreamingResponse(
        store.iter_bytes(artifact.sha256),
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{artifact.name}"',
            "Content-Length": str(artifact.size_bytes),
            "X-Content-SHA256": artifact.sha256,
        },
    )


@router.get("/{job_id}/report", responses={404: {"model": ErrorResponse}})
def get_report(job: JobDep) -> dict[str, Any]:
    """The metric report (JSON) of a finished job."""
    if job.report is None:
        raise NotFound(f"job {job.id} has no report yet (status {job.status})", {"status": job.status},
                       code="report_not_ready")
    return job.report



