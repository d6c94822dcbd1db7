# syntax=docker/dockerfile:1
# Two images from one file:
#   --target api     slim API image: FastAPI + SQLAlchemy + Celery client, no torch
#   --target worker  compression worker with PyTorch (CPU by default; TORCH_INDEX for CUDA builds)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MODELPRESS_DATA_DIR=/data
WORKDIR /srv/modelpress
RUN useradd --create-home --uid 1000 modelpress && mkdir -p /data && chown modelpress /data
COPY pyproject.toml README.md ./
COPY app ./app
COPY jobspec ./jobspec
COPY worker/__init__.py ./worker/__init__.py
COPY alembic ./alembic
COPY alembic.ini ./

FROM base AS api
RUN pip install .
USER modelpress
EXPOSE 8000
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
ARG TORCH_INDEX=""
# torch.compile (the PT2E int8 runtime) generates and compiles C++ kernels at run time.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN if [ -n "$TORCH_INDEX" ]; then \
      pip install --index-url "$TORCH_INDEX" torch==2.14.1 torchvision==0.29.1; \
    else \
      pip install torch==2.14.1 torchvision==0.29.1; \
    fi
COPY worker ./worker
RUN pip install ".[worker]"
USER modelpress
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "modelpress.jobs,modelpress.inspect", "-c", "1", "--loglevel=INFO"]
