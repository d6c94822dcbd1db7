"""Tenants and API keys; needs the admin key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import AdminDep, ObjectId, SessionDep
from app.db.models import ApiKey, Tenant
from app.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyRead, ErrorResponse, TenantCreate, TenantRead
from app.services import auth

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses={403: {"model": ErrorResponse}})


@router.post("/tenants", response_model=TenantRead, status_code=201, responses={409: {"model": ErrorResponse}})
def create_tenant(payload: TenantCreate, db: SessionDep, _: AdminDep) -> Tenant:
    return auth.create_tenant(db=db, name=payload.name, max_concurrent_jobs=payload.max_concurrent_jobs)


@router.get("/tenants", response_model=list[TenantRead])
def list_tenants(db: SessionDep, _: AdminDep) -> list[Tenant]:
    return list(db.scalars(select(Tenant).order_by(Tenant.created_at)))


@router.post("/tenants/{tenant_id}/keys", response_model=ApiKeyCreated, status_code=201,
             responses={404: {"model": ErrorResponse}})
def create_key(tenant_id: ObjectId, payload: ApiKeyCreate, db: SessionDep, _: AdminDep) -> dict[str, Any]:
    """Issue a key. The plain key is in this answer only: store it now."""
    key, plain = auth.create_key(db=db, tenant_id=tenant_id, name=payload.name)
    return ApiKeyRead.model_validate(key).model_dump() | {"key": plain}


@router.get("/tenants/{tenant_id}/keys", response_model=list[ApiKeyRead])
def list_keys(tenant_id: ObjectId, db: SessionDep, _: AdminDep) -> list[ApiKey]:
    return list(db.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)))


@router.delete("/keys/{key_id}", response_model=ApiKeyRead, responses={404: {"model": ErrorResponse}})
def revoke_key(key_id: ObjectId, db: SessionDep, _: AdminDep) -> ApiKey:
    """Revoke a key; requests with it get 401 from now on."""
    return auth.revoke_key(db=db, key_id=key_id)
