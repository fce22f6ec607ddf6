# heimdall-inference worker: slim, non-root, the reference models (2 m, 70 cm) baked in (they ship in the package).
#   docker build -f worker.Dockerfile -t heimdall-inference-worker .
#   docker run --env-file .env heimdall-inference-worker
FROM python:3.11-slim-bookworm AS build
# extras: flower (the dashboard); add registry for the MLflow client the `model` commands use (not the workers)
ARG EXTRAS=flower
WORKDIR /src
COPY pyproject.toml setup.cfg README.md celeryconfig.py ./
COPY heimdall_inference ./heimdall_inference
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[${EXTRAS}]"

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1
RUN groupadd --system --gid 10001 heimdall && useradd --system --uid 10001 --gid heimdall --home-dir /app --shell /usr/sbin/nologin heimdall
WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY celeryconfig.py ./
# verified registry downloads (HEIMDALL_MODEL_URI=models:/...): ~/.cache/heimdall/models, a volume in compose
RUN mkdir -p /app/.cache/heimdall/models && chown -R heimdall:heimdall /app/.cache
USER 10001:10001
# /metrics for Prometheus and /healthz (live children and a broker connection) on HEIMDALL_METRICS_PORT.
ENV HEIMDALL_METRICS_PORT=9808
EXPOSE 9808
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9808/healthz', timeout=5)"]
# SIGTERM = Celery's soft shutdown, then a cold one: running tasks get HEIMDALL_SHUTDOWN_TIMEOUT_S (20 s) to
# finish, then end; every unacknowledged message returns to the queue (acks late, idempotent rows). Keep the
# orchestrator's grace period above it (compose stop_grace_period 60 s, Kubernetes terminationGracePeriodSeconds).
ENV REMAP_SIGTERM=SIGQUIT
STOPSIGNAL SIGTERM
CMD ["celery", "-A", "heimdall_inference.worker", "worker", "--loglevel", "INFO", "--concurrency", "2"]
