# One image for the API, the workers and the migration step.
# CPU (the default, tagged attribution-service:cpu by docker-compose.yml):
#   docker build -t attribution-service:cpu .
# GPU workers (tagged attribution-service:gpu; docker compose --profile gpu builds it):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t attribution-service:gpu .
# No HEALTHCHECK here: every container of the image would inherit it, and workers serve no HTTP.
# docker-compose.yml gives the api an HTTP check and the workers a Redis check.
FROM python:3.11-slim AS base

ARG TORCH_VERSION=2.13.0
# Recorded in every result's provenance (`docker build --build-arg SOURCE_COMMIT=$(git rev-parse HEAD)`).
ARG SOURCE_COMMIT=
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DATA_ROOT=/data SOURCE_COMMIT=${SOURCE_COMMIT}

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md alembic.ini ./
COPY attribution ./attribution
COPY attribution_client ./attribution_client
COPY loading ./loading
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
COPY benchmarks ./benchmarks
RUN pip install ".[hf]"

# /data belongs to the app user, so a named volume mounted there starts writable (Docker copies
# the image's ownership into a new named volume); a bind-mounted host folder must be owned by
# uid 10001 (README, "Docker").
RUN useradd --create-home --uid 10001 app && mkdir -p /data && chown app /data
USER app
VOLUME ["/data"]
EXPOSE 8000
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
