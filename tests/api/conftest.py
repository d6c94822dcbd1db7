"""API tests: the real app on SQLite, with the queue replaced by one that runs the worker's
functions in-process (the queue itself is tested with real worker processes in tests/integration)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.api.deps import get_task_queue
from app.main import app
from app.services import webhooks
from tests.factories import LOCAL_AUTH
from tests.migrations import upgrade_head


class InProcessQueue:
    """Runs inspections at once; records jobs and runs them only when `run_jobs` is set."""

    def __init__(self, run_jobs: bool = True):
        self.run_jobs = run_jobs
        self.sent: list[tuple[str, str]] = []

    def enqueue_job(self, job_id: str, queue: str = "modelpress.jobs") -> None:
        self.sent.append(("job", job_id))
        if self.run_jobs:
            from worker.jobs import execute_job

            execute_job(job_id, worker_name="in-process")

    def enqueue_model_inspection(self, model_id: str) -> None:
        from worker.jobs import inspect_model_upload

        self.sent.append(("model", model_id))
        inspect_model_upload(model_id)

    def enqueue_dataset_inspection(self, dataset_id: str) -> None:
        from worker.jobs import inspect_dataset_upload

        self.sent.append(("dataset", dataset_id))
        inspect_dataset_upload(dataset_id)

    def enqueue_webhook(self, job_id: str) -> None:
        from worker.webhooks import deliver

        self.sent.append(("webhook", job_id))
        attempt = 0
        while deliver(job_id, attempt) is not None:  # retries at once; the backoff is tested on its own
            attempt += 1

    def ping(self) -> bool:
        return True


@pytest.fixture(scope="session", autouse=True)
def _schema() -> None:
    upgrade_head()


@pytest.fixture
def queue() -> Iterator[InProcessQueue]:
    q = InProcessQueue()
    app.dependency_overrides[get_task_queue] = lambda: q
    webhooks.queue_provider = lambda: q
    yield q
    app.dependency_overrides.pop(get_task_queue, None)
    webhooks.queue_provider = webhooks._default_queue


@pytest.fixture
def client(queue: InProcessQueue) -> Iterator[TestClient]:
    with TestClient(app, headers=LOCAL_AUTH) as test_client:
        yield test_client


def upload(client: TestClient, path: str, content: bytes, filename: str, **form: str):
    return client.post(path, files={"file": (filename, content, "application/octet-stream")}, data=form)
