"""The FastAPI application."""

from __future__ import annotations

from fastapi import FastAPI

from app.api.routes import admin, health, jobs, tenant, uploads
from app.errors import install_error_handlers
from app.observability import install_metrics


def create_app() -> FastAPI:
    app = FastAPI(
        title="ModelPress",
        version="0.1.0",
        description="Compression-as-a-service for PyTorch models: upload a model, post a job spec "
        "(prune, fine-tune, quantize, distill, benchmark), collect a smaller model and a measured report.",
    )
    install_error_handlers(app)
    install_metrics(app)
    app.include_router(health.router)
    app.include_router(uploads.router)
    app.include_router(jobs.router)
    app.include_router(admin.router)
    app.include_router(tenant.router)
    return app


app = create_app()
