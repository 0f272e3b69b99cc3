# syntax=docker/dockerfile:1
#
# estat-ingest image: build the wheel and its dependencies on python:3.11-slim (bookworm), run them
# on distroless python3-debian12, whose interpreter is Debian 12's CPython 3.11 -- the same minor as
# the builder, so the cp311 wheels installed here load there.
#
# The runtime has no shell, no pip, no curl: everything below is exec form, and the container
# health check is the app itself (`python -m estat_ingest healthcheck`).
#
# tests/deploy/test_dockerfile.py lints this file; tests/deploy/test_image_install.py reproduces the
# install step (pip wheel + pip install --target) and runs the result with the ENV set below.

ARG BUILDER_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/python3-debian12:nonroot

# ---------------------------------------------------------------------------------------------------
FROM ${BUILDER_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# a C compiler for the project's one extension (estat_ingest/_speedups.c: the NDJSON body's per-event
# loops); it stays in this stage, the runtime gets the built module only
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY estat_ingest ./estat_ingest

# 1. the project's wheel (compiling estat_ingest/_speedups.c); 2. the wheel plus every dependency into
#    one self-contained directory (dependencies as binary wheels only: none is compiled here);
# 3. drop the console scripts (their shebang is the builder's /usr/local/bin/python);
# 4. the state tree the non-root user writes to (the runtime has no mkdir).
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m pip install --only-binary=:all: --target /app/site /wheels/estat_ingest-*.whl \
 && rm -rf /app/site/bin \
 && mkdir -p /state/var/lib/estat-ingest/dlq /state/var/lib/estat-ingest/data /state/var/lib/estat-ingest/tmp

# Smoke test, the way the runtime runs it (-S: no site-packages but /app/site).
RUN PYTHONPATH=/app/site PYTHONSAFEPATH=1 python -S -m estat_ingest --version

# ---------------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}

# Code and dependencies: owned by root, read-only for the app user.
COPY --from=builder /app/site /app/site
# State (DLQ, file sink, temp files): the only place the app writes; owned by the app user.
COPY --from=builder --chown=65532:65532 /state/var/lib/estat-ingest /var/lib/estat-ingest

# PYTHONPATH is the only place packages come from (distroless has no site-packages of its own);
# PYTHONSAFEPATH keeps the working directory off sys.path; bytecode was compiled by pip in the
# builder and the root filesystem is read-only in production anyway.
ENV PYTHONPATH=/app/site \
    PYTHONSAFEPATH=1 \
    PYTHONNOUSERSITE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/var/lib/estat-ingest/tmp \
    HTTP_ADDR=:8080 \
    DLQ_DIR=/var/lib/estat-ingest/dlq \
    FILE_SINK_DIR=/var/lib/estat-ingest/data

WORKDIR /var/lib/estat-ingest

# ECS (Fargate bind mounts) copies a VOLUME's contents and ownership into a task volume mounted at
# the same path, so the non-root user can write the DLQ with a read-only root filesystem. On
# Kubernetes the manifests mount an emptyDir or a PersistentVolumeClaim here instead.
VOLUME ["/var/lib/estat-ingest"]

# Numeric, so Kubernetes' runAsNonRoot can verify it (65532 = distroless "nonroot").
USER 65532:65532

EXPOSE 8080
STOPSIGNAL SIGTERM

HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/usr/bin/python3.11", "-m", "estat_ingest", "healthcheck"]

ENTRYPOINT ["/usr/bin/python3.11", "-m", "estat_ingest"]
CMD ["serve"]
