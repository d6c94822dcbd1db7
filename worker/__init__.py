"""ModelPress worker: the Celery app, its thin tasks, and the compression engine."""
