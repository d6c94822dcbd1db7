"""ModelPress HTTP API. Never imports torch or worker code: it enqueues tasks by name."""
