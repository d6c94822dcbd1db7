"""The API process stays torch-free; the engine stays free of web, DB and queue code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _loaded_modules(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


def test_api_process_never_imports_torch_or_worker_code():
    loaded = _loaded_modules("import app.main")
    assert "fastapi" in loaded
    assert not loaded & {"torch", "torchvision", "worker", "torch_pruning"}


def test_engine_imports_no_web_db_or_queue_code():
    loaded = _loaded_modules("import worker.engine, worker.engine.pipeline")
    assert "torch" in loaded
    assert not loaded & {"fastapi", "sqlalchemy", "celery", "kombu", "app", "starlette", "uvicorn"}


def test_job_specs_are_torch_free():
    loaded = _loaded_modules("import jobspec")
    assert not loaded & {"torch", "fastapi", "sqlalchemy", "celery"}
