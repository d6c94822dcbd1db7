"""What the tasks do: re-fetch rows, call the engine, write results back. Safe to run twice."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.db.models import Artifact, Dataset, Job, JobStatus, Model, UploadStatus, utcnow
from app.db.session import session_scope
from app.services.job_lifecycle import add_event, transition
from app.storage import BlobStore, get_blob_store
from jobspec import PipelineSpec
from worker import engine
from worker.engine.types import Artifact as EngineArtifact
from worker.engine.types import Canceled, DatasetSource, EngineError, ModelSource, PipelineHooks
from worker.logs import job_log
from worker.recovery import heartbeat_is_fresh

log = logging.getLogger("modelpress.worker")


def _store() -> BlobStore:
    return get_blob_store()


def _internal_error(exc: BaseException) -> dict[str, Any]:
    return {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}", "details": {}}


def inspect_model_upload(model_id: str) -> None:
    """Validate an uploaded model file and record what it is."""
    with session_scope() as db:
        row = db.get(Model, model_id)
        if row is None or row.status != UploadStatus.VALIDATING:
            return
        path, architecture, kwargs = _store().local_path(row.sha256), row.architecture, dict(row.arch_kwargs or {})
    try:
        source, info = engine.inspect_model(path, architecture, kwargs)
        updates: dict[str, Any] = {
            "status": UploadStatus.READY, "format": source.format, "architecture": info.architecture,
            "param_count": info.param_count, "input_shape": info.input_shape, "num_outputs": info.num_outputs,
        }
    except EngineError as exc:
        updates = {"status": UploadStatus.INVALID, "error": exc.to_dict()}
    except Exception as exc:
        log.exception("model inspection crashed", extra={"model_id": model_id})
        updates = {"status": UploadStatus.INVALID, "error": _internal_error(exc)}
    _update_upload(Model, model_id, updates)


def inspect_dataset_upload(dataset_id: str) -> None:
    """Validate an uploaded dataset file and record its size, classes and shape."""
    with session_scope() as db:
        row = db.get(Dataset, dataset_id)
        if row is None or row.status != UploadStatus.VALIDATING:
            return
        path = _store().local_path(row.sha256)
    try:
        source, info = engine.inspect_dataset(path)
        updates: dict[str, Any] = {
            "status": UploadStatus.READY, "format": source.format, "num_samples": info.num_samples,
            "classes": info.classes, "input_shape": info.input_shape,
        }
    except EngineError as exc:
        updates = {"status": UploadStatus.INVALID, "error": exc.to_dict()}
    except Exception as exc:
        log.exception("dataset inspection crashed", extra={"dataset_id": dataset_id})
        updates = {"status": UploadStatus.INVALID, "error": _internal_error(exc)}
    _update_upload(Dataset, dataset_id, updates)


def _update_upload(entity: type[Model] | type[Dataset], object_id: str, updates: dict[str, Any]) -> None:
    with session_scope() as db:
        row = db.get(entity, object_id)
        if row is None or row.status != UploadStatus.VALIDATING:
            return
        for key, value in updates.items():
            setattr(row, key, value)


class _JobTracker:
    """Writes a running job's progress and step events to its row; reads cancel requests."""

    PROGRESS_EVERY_S = 1.0
    CANCEL_CHECK_EVERY_S = 0.5

    def __init__(self, job_id: str):
        self.job_id = job_id
        self._last_progress = 0.0
        self._last_cancel_check = 0.0

    def hooks(self) -> PipelineHooks:
        return PipelineHooks(on_step_start=self._step_start, on_step_end=self._step_end,
                             on_progress=self._progress, check_canceled=self._check_canceled)

    def _step_start(self, index: int, kind: str) -> None:
        log.info("step %d (%s) started", index, kind)
        with session_scope() as db:
            job = db.get(Job, self.job_id)
            job.current_step, job.current_step_kind, job.heartbeat_at = index, kind, utcnow()
            add_event(db, job, "step_started", step=index, kind=kind, message=f"step {index} ({kind}) started")

    def _step_end(self, index: int, kind: str, summary: dict[str, Any]) -> None:
        log.info("step %d (%s) finished", index, kind, extra={"summary": summary})
        with session_scope() as db:
            job = db.get(Job, self.job_id)
            job.heartbeat_at = utcnow()
            add_event(db, job, "step_finished", step=index, kind=kind, message=f"step {index} ({kind}) finished",
                      data=summary)

    def _progress(self, percent: float, message: str) -> None:
        now = time.monotonic()
        if now - self._last_progress < self.PROGRESS_EVERY_S:
            return
        self._last_progress = now
        with session_scope() as db:
            job = db.get(Job, self.job_id)
            job.progress = round(max(0.0, min(percent, 99.9)), 1)
            job.message = message[:1000]
            job.heartbeat_at = utcnow()

    def _check_canceled(self) -> None:
        now = time.monotonic()
        if now - self._last_cancel_check < self.CANCEL_CHECK_EVERY_S:
            return
        self._last_cancel_check = now
        with session_scope() as db:
            job = db.get(Job, self.job_id)
            if job.cancel_requested:
                raise Canceled("canceled by request")


class _Heartbeat:
    """Stamps the job's heartbeat from a background thread while it runs, however long a step is."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        interval = get_settings().heartbeat_interval_s
        while not self._stop.wait(interval):
            try:
                with session_scope() as db:
                    db.execute(update(Job).where(Job.id == self.job_id, Job.status == JobStatus.RUNNING)
                               .values(heartbeat_at=utcnow()))
            except Exception:  # a missed beat is survivable; a dead thread is not
                log.exception("heartbeat of job %s failed", self.job_id)


_Claimed = tuple[PipelineSpec, ModelSource, DatasetSource | None, int]


def _start(job_id: str, worker_name: str) -> _Claimed | None:
    """Claim the job; None when there is nothing to run (finished, canceled or unknown)."""
    store = _store()
    with session_scope() as db:
        job = db.get(Job, job_id, with_for_update=True)
        if job is None:
            log.warning("job %s does not exist; dropping the task", job_id)
            return None
        if job.status in JobStatus.TERMINAL:
            return None  # a duplicate delivery of a finished job
        if job.cancel_requested:
            transition(db, job, JobStatus.CANCELED, message="canceled before it started")
            return None
        retry = job.status == JobStatus.RUNNING
        if retry and heartbeat_is_fresh(job):
            log.info("job %s is running on %s; dropping the duplicate delivery", job_id, job.worker)
            return None
        if job.attempts >= get_settings().max_attempts:
            transition(db, job, JobStatus.FAILED, message="too many attempts",
                       error={"code": "worker_lost", "details": {"attempts": job.attempts},
                              "message": f"the job was started {job.attempts} times without finishing; giving up"})
            return None
        transition(db, job, JobStatus.RUNNING,
                   message=f"{'restarted' if retry else 'running'} on {worker_name}")
        job.worker, job.progress = worker_name, 0.0
        model, dataset = job_model_and_dataset(db, job)
        model_source = ModelSource(format=model.format, path=store.local_path(model.sha256),
                                   architecture=model.architecture, arch_kwargs=dict(model.arch_kwargs or {}))
        dataset_source = (
            DatasetSource(format=dataset.format, path=store.local_path(dataset.sha256)) if dataset is not None else None
        )
        return PipelineSpec.model_validate(job.spec), model_source, dataset_source, job.attempts


def job_model_and_dataset(db: Session, job: Job) -> tuple[Model, Dataset | None]:
    model = db.get(Model, job.model_id)
    dataset = db.get(Dataset, job.dataset_id) if job.dataset_id else None
    return model, dataset


def _finish(job_id: str, status: str, *, message: str, error: dict[str, Any] | None = None,
            report: dict[str, Any] | None = None, artifacts: list[Artifact] | None = None) -> None:
    with session_scope() as db:
        job = db.get(Job, job_id, with_for_update=True)
        if job is None or job.status in JobStatus.TERMINAL:
            return
        if artifacts is not None:
            for old in list(job.artifacts):
                db.delete(old)
            db.flush()
            for artifact in artifacts:
                artifact.job_id = job_id
                db.add(artifact)
        if report is not None:
            job.report = report
        transition(db, job, status, message=message, error=error)


@dataclass
class _Outcome:
    status: str
    message: str
    error: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    artifacts: list[Artifact] = field(default_factory=list)


def _run(job_id: str, claimed: _Claimed, workdir: Path) -> _Outcome:
    spec, model_source, dataset_source, attempt = claimed
    log.info("job started (attempt %d)", attempt, extra={"steps": [s.kind for s in spec.steps]})
    try:
        with _Heartbeat(job_id):
            result = engine.run_pipeline(model_source, spec, dataset_source, workdir, _JobTracker(job_id).hooks())
            artifacts = _store_artifacts(result.artifacts)
    except Canceled:
        log.info("job canceled")
        return _Outcome(JobStatus.CANCELED, "canceled while running")
    except EngineError as exc:
        log.info("job failed: %s", exc.message, extra={"error": exc.to_dict()})
        return _Outcome(JobStatus.FAILED, exc.message, error=exc.to_dict())
    except SoftTimeLimitExceeded:
        limit = get_settings().job_soft_time_limit_s
        log.warning("job ran past its time limit of %s s", limit)
        return _Outcome(JobStatus.FAILED, f"the job ran past its time limit of {limit} s",
                        error={"code": "time_limit", "message": f"time limit of {limit} s exceeded", "details": {}})
    except Exception as exc:
        log.exception("job crashed")
        return _Outcome(JobStatus.FAILED, "internal error", error=_internal_error(exc))
    log.info("job succeeded", extra={"artifacts": [a.name for a in artifacts]})
    return _Outcome(JobStatus.SUCCEEDED, "done", report=result.report, artifacts=artifacts)


def execute_job(job_id: str, *, worker_name: str) -> None:
    """Run one job end to end. Running it again after a crash starts it over and writes one result."""
    claimed = _start(job_id, worker_name)
    if claimed is None:
        return
    attempt_dir = get_settings().work_dir / job_id / f"attempt-{claimed[3]}"
    shutil.rmtree(attempt_dir, ignore_errors=True)
    workdir = attempt_dir / "work"
    workdir.mkdir(parents=True)
    log_path = attempt_dir / "job.log"
    try:
        with job_log(job_id, log_path):
            outcome = _run(job_id, claimed, workdir)
        # The job's own log is an artifact of every outcome: most useful when it failed.
        outcome.artifacts += _store_artifacts(
            [EngineArtifact("job.log", log_path, "log", "jsonl", "the worker's log lines for this job, JSON per line")]
        )
        _finish(job_id, outcome.status, message=outcome.message, error=outcome.error, report=outcome.report,
                artifacts=outcome.artifacts)
    finally:
        shutil.rmtree(attempt_dir, ignore_errors=True)


def _store_artifacts(produced: list[EngineArtifact]) -> list[Artifact]:
    store = _store()
    rows = []
    for item in produced:
        sha, size = store.put_file(Path(item.path))
        rows.append(Artifact(name=item.name, kind=item.kind, format=item.format, description=item.description,
                             sha256=sha, size_bytes=size))
    return rows
