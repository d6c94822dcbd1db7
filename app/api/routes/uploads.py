"""POST/GET /v1/models and /v1/datasets."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, Request, Response, UploadFile
from sqlalchemy import select

from app.api.deps import DatasetDep, ModelDep, QueueDep, SessionDep, SettingsDep, StoreDep, TenantDep
from app.db.models import Dataset, Model, UploadStatus
from app.errors import PayloadTooLarge, Unprocessable
from app.schemas import DatasetRead, ErrorResponse, ModelRead, Page
from app.services import uploads as upload_service
from app.services.pagination import paginate

router = APIRouter(prefix="/v1", tags=["uploads"])

UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "The file is larger than MODELPRESS_MAX_UPLOAD_BYTES."},
    422: {"model": ErrorResponse, "description": "The file or a form field was rejected; `error.details` says why."},
    503: {"model": ErrorResponse, "description": "The task queue is unreachable; nothing was stored."},
}
Limit = Annotated[int, Query(ge=1, le=200)]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=255, description="Retrying with the same key returns the first result."),
]


def _reject_oversized(request: Request, settings: SettingsDep) -> None:
    # Refuse early on the declared length; the streamed copy enforces the limit again for chunked bodies.
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + 1024 * 1024:
        raise PayloadTooLarge(
            f"upload exceeds the limit of {settings.max_upload_bytes} bytes", {"limit_bytes": settings.max_upload_bytes}
        )


def _parse_kwargs(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Unprocessable(f"arch_kwargs is not valid JSON: {exc.msg}", {"field": "arch_kwargs"}) from exc
    if not isinstance(value, dict) or not all(isinstance(v, (int, float, bool, str)) for v in value.values()):
        raise Unprocessable("arch_kwargs must be a JSON object of numbers, booleans and strings",
                            {"field": "arch_kwargs"})
    return value


def _created(response: Response, row: Model | Dataset, path: str) -> None:
    response.headers["Location"] = f"/v1/{path}/{row.id}"
    response.status_code = 201 if row.status == UploadStatus.READY else 202


@router.post(
    "/models",
    response_model=ModelRead,
    status_code=201,
    responses={202: {"model": ModelRead, "description": "Stored; a worker is still validating it."}, **UPLOAD_ERRORS},
)
def upload_model(
    request: Request,
    response: Response,
    db: SessionDep,
    store: StoreDep,
    queue: QueueDep,
    settings: SettingsDep,
    principal: TenantDep,
    file: Annotated[UploadFile, File(description="safetensors, a state_dict .pt, or a torch.export .pt2")],
    architecture: Annotated[str | None, Form(max_length=100, description="torchvision name, e.g. resnet18")] = None,
    arch_kwargs: Annotated[str | None, Form(max_length=10000, description='JSON, e.g. {"num_classes": 10}')] = None,
    name: Annotated[str | None, Form(max_length=200)] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Model:
    """Upload a model. Weights need `architecture`; a torch.export program needs nothing else."""
    _reject_oversized(request, settings)
    kwargs = _parse_kwargs(arch_kwargs)
    sha, size = upload_service.store_upload(store=store, stream=file.file, settings=settings)
    filename = (file.filename or "model")[:255]
    row = Model(tenant_id=principal.tenant_id, name=name or filename, filename=filename, sha256=sha, size_bytes=size,
                architecture=architecture or None, arch_kwargs=kwargs)
    row = upload_service.create_and_validate(db=db, store=store, queue=queue, settings=settings, row=row,
                                             idempotency_key=idempotency_key)
    _created(response, row, "models")
    return row


@router.get("/models", response_model=Page[ModelRead])
def list_models(db: SessionDep, principal: TenantDep, limit: Limit = 50, cursor: str | None = None) -> dict[str, Any]:
    stmt = select(Model).where(Model.tenant_id == principal.tenant_id)
    items, next_cursor = paginate(db, stmt, Model, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": next_cursor}


@router.get("/models/{model_id}", response_model=ModelRead, responses={404: {"model": ErrorResponse}})
def get_model(model: ModelDep) -> Model:
    return model


@router.post(
    "/datasets",
    response_model=DatasetRead,
    status_code=201,
    responses={202: {"model": DatasetRead, "description": "Stored; a worker is still validating it."}, **UPLOAD_ERRORS},
)
def upload_dataset(
    request: Request,
    response: Response,
    db: SessionDep,
    store: StoreDep,
    queue: QueueDep,
    settings: SettingsDep,
    principal: TenantDep,
    file: Annotated[UploadFile, File(description="zip / tar.gz image folders, or safetensors / .npz tensors")],
    name: Annotated[str | None, Form(max_length=200)] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Dataset:
    """Upload a dataset: an ImageFolder archive, or tensors named `inputs` and `labels`."""
    _reject_oversized(request, settings)
    sha, size = upload_service.store_upload(store=store, stream=file.file, settings=settings)
    filename = (file.filename or "dataset")[:255]
    row = Dataset(tenant_id=principal.tenant_id, name=name or filename, filename=filename, sha256=sha,
                  size_bytes=size)
    row = upload_service.create_and_validate(db=db, store=store, queue=queue, settings=settings, row=row,
                                             idempotency_key=idempotency_key)
    _created(response, row, "datasets")
    return row


@router.get("/datasets", response_model=Page[DatasetRead])
def list_datasets(db: SessionDep, principal: TenantDep, limit: Limit = 50, cursor: str | None = None) -> dict[str, Any]:
    stmt = select(Dataset).where(Dataset.tenant_id == principal.tenant_id)
    items, next_cursor = paginate(db, stmt, Dataset, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": next_cursor}


@router.get("/datasets/{dataset_id}", response_model=DatasetRead, responses={404: {"model": ErrorResponse}})
def get_dataset(dataset: DatasetDep) -> Dataset:
    return dataset
