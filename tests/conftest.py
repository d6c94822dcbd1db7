"""Test-wide setup: a private data folder and database for this test session, set before the app loads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ADMIN_KEY = "test-admin-key-0123456789abcdef"
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="modelpress-tests-"))
os.environ["MODELPRESS_DATA_DIR"] = str(_SESSION_DIR / "data")
os.environ["MODELPRESS_ENV"] = "test"
os.environ.pop("DATABASE_URL", None)
os.environ.pop("CELERY_BROKER_URL", None)
os.environ.setdefault("MODELPRESS_VALIDATION_WAIT_S", "5")
os.environ["MODELPRESS_ADMIN_KEY"] = ADMIN_KEY
