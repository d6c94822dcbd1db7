"""One typed settings object, read from environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


DEV_LOCAL_KEY = "mp-local-dev-key"
PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "admin", DEV_LOCAL_KEY}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    environment: Literal["dev", "test", "prod"] = Field("dev", validation_alias="MODELPRESS_ENV")
    data_dir: Path = Field(Path("data"), validation_alias="MODELPRESS_DATA_DIR")
    # Empty means the embedded default under data_dir: SQLite and kombu's filesystem transport.
    database_url: str = Field("", validation_alias=AliasChoices("DATABASE_URL", "MODELPRESS_DATABASE_URL"))
    celery_broker_url: str = Field("", validation_alias=AliasChoices("CELERY_BROKER_URL", "MODELPRESS_BROKER_URL"))

    # Manages tenants and keys (/v1/admin). Required outside dev/test; never a placeholder in prod.
    admin_api_key: SecretStr | None = Field(None, validation_alias="MODELPRESS_ADMIN_KEY")
    # Dev/test only: a documented key for the built-in "local" tenant, so `make run` works out of the box.
    local_api_key: str = Field(DEV_LOCAL_KEY, validation_alias="MODELPRESS_LOCAL_KEY")
    # How long an API key lookup is cached in each API process (a revocation reaches other processes
    # within this time; the revoking process drops its cache at once). 0 disables the cache.
    auth_cache_ttl_s: float = Field(10.0, ge=0, validation_alias="MODELPRESS_AUTH_CACHE_TTL_S")
    max_concurrent_jobs_per_tenant: int = Field(8, ge=1, validation_alias="MODELPRESS_MAX_CONCURRENT_JOBS")

    # Empty: blobs on the local disk under data_dir. s3://bucket/prefix: S3-compatible object storage
    # (credentials from the usual AWS_* variables; MODELPRESS_S3_ENDPOINT_URL for MinIO, Ceph, ...).
    storage_url: str = Field("", validation_alias="MODELPRESS_STORAGE_URL")
    s3_endpoint_url: str | None = Field(None, validation_alias="MODELPRESS_S3_ENDPOINT_URL")

    max_upload_bytes: int = Field(2 * 1024**3, gt=0, validation_alias="MODELPRESS_MAX_UPLOAD_BYTES")
    # How long an upload request waits for a worker to validate the file before answering 202.
    validation_wait_s: float = Field(60.0, ge=0, validation_alias="MODELPRESS_VALIDATION_WAIT_S")
    job_soft_time_limit_s: int = Field(6 * 3600, gt=0, validation_alias="MODELPRESS_JOB_SOFT_TIME_LIMIT_S")
    job_time_limit_s: int = Field(6 * 3600 + 300, gt=0, validation_alias="MODELPRESS_JOB_TIME_LIMIT_S")
    # A running job's worker writes a heartbeat this often; a job silent for heartbeat_timeout_s is
    # considered orphaned (its worker died) and is re-queued, up to max_attempts runs in all.
    heartbeat_interval_s: float = Field(5.0, gt=0, validation_alias="MODELPRESS_HEARTBEAT_INTERVAL_S")
    heartbeat_timeout_s: float = Field(60.0, gt=0, validation_alias="MODELPRESS_HEARTBEAT_TIMEOUT_S")
    max_attempts: int = Field(3, ge=1, le=20, validation_alias="MODELPRESS_MAX_ATTEMPTS")

    @model_validator(mode="after")
    def _prod_needs_real_services(self) -> Settings:
        if self.environment == "prod":
            if not self.database_url or not self.celery_broker_url:
                raise ValueError("MODELPRESS_ENV=prod needs DATABASE_URL and CELERY_BROKER_URL set explicitly")
            admin = self.admin_api_key.get_secret_value() if self.admin_api_key else ""
            if admin in PLACEHOLDER_SECRETS or len(admin) < 24:
                raise ValueError("MODELPRESS_ENV=prod needs MODELPRESS_ADMIN_KEY: a random secret of 24+ characters")
        if self.heartbeat_timeout_s < 3 * self.heartbeat_interval_s:
            raise ValueError("MODELPRESS_HEARTBEAT_TIMEOUT_S must be at least 3x MODELPRESS_HEARTBEAT_INTERVAL_S")
        if self.job_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError("MODELPRESS_JOB_TIME_LIMIT_S must exceed MODELPRESS_JOB_SOFT_TIME_LIMIT_S")
        return self

    @property
    def local_key(self) -> str | None:
        """The built-in local tenant's key; there is none in prod."""
        return None if self.environment == "prod" or not self.local_api_key else self.local_api_key

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'modelpress.db'}"

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or "filesystem://"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def blob_dir(self) -> Path:
        return self.resolved_data_dir / "blobs"

    @property
    def tmp_dir(self) -> Path:
        return self.resolved_data_dir / "tmp"

    @property
    def broker_dir(self) -> Path:
        return self.resolved_data_dir / "broker"

    @property
    def work_dir(self) -> Path:
        return self.resolved_data_dir / "work"


@lru_cache
def get_settings() -> Settings:
    return Settings()
