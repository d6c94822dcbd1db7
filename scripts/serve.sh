#!/usr/bin/env bash
# Runs migrations, two Celery workers (jobs, upload inspection) and the API; stops them all on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PORT:=8000}"
: "${HOST:=127.0.0.1}"
export MODELPRESS_DATA_DIR="${MODELPRESS_DATA_DIR:-$PWD/data}"
mkdir -p "$MODELPRESS_DATA_DIR"

alembic upgrade head
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

celery -A worker.celery_app worker -Q modelpress.jobs -c 1 -n "jobs@%h" --loglevel=INFO &
pids+=($!)
celery -A worker.celery_app worker -Q modelpress.inspect -c 1 -n "inspect@%h" --loglevel=INFO &
pids+=($!)
uvicorn app.main:app --host "$HOST" --port "$PORT" &
pids+=($!)
echo "ModelPress: http://$HOST:$PORT/docs (data in $MODELPRESS_DATA_DIR)" >&2
wait -n "${pids[@]}"
