# One image for the API, the workers and the migration step.
# CPU by default; for GPU workers build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t attribution:gpu .
FROM python:3.11-slim AS base

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DATA_ROOT=/data

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md alembic.ini ./
COPY attribution ./attribution
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
COPY benchmarks ./benchmarks
RUN pip install ".[hf]"

RUN useradd --create-home --uid 10001 app && mkdir -p /data && chown app /data
USER app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
