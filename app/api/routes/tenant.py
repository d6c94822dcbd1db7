"""The calling tenant's own settings."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SessionDep, TenantDep
from app.db.models import Tenant
from app.schemas import ErrorResponse, TenantSelf

router = APIRouter(prefix="/v1", tags=["tenant"])


@router.get("/tenant", response_model=TenantSelf, responses={401: {"model": ErrorResponse}})
def who_am_i(db: SessionDep, principal: TenantDep) -> Tenant:
    """The tenant of this key, with the secret that signs its webhooks."""
    return db.get(Tenant, principal.tenant_id)
