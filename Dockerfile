# aigw container image: the gateway (`aigw serve`, the default command) and the
# scale-out worker (`aigw worker`, [jobs] executor = "celery") from one image.
#
#   docker build -t aigw:0.1.0 .
#   openssl rand -hex 32 > metrics-token && chmod 644 metrics-token   # the bearer token of /metrics
#   docker run -d -p 11112:11112 -p 9110:9110 -v aigw-data:/data \
#     -v "$PWD/metrics-token:/run/secrets/aigw-metrics-token:ro" aigw:0.1.0              # CPU (--gpus all: GPU)
#   docker run --rm -v "$PWD/aigw.toml:/etc/aigw/aigw.toml:ro" aigw:0.1.0 config check --config /etc/aigw/aigw.toml
#
# GPU: onnxruntime-gpu from PyPI is built for one CUDA major. 1.31.1 (ORT_VERSION)
# is built for CUDA 13.0: its CUDA provider links libcudart.so.13, libcublas.so.13,
# libcublasLt.so.13 and libcurand.so.10, and loads cuDNN 9. The base image below
# ships exactly those; the check after the install stops the build if the two ever
# disagree (a newer onnxruntime-gpu, or another CUDA_IMAGE). The host needs an
# NVIDIA driver that supports CUDA 13 (R580 or newer) and the NVIDIA Container
# Toolkit; an older driver makes the container refuse to start with --gpus.
#
# CPU: without a GPU (no --gpus, no driver) the same image runs every model on
# ONNX Runtime's CPU provider; `aigw models list` says which provider is in use.
#
# No BuildKit-only syntax (heredocs, cache mounts): the classic builder and
# kaniko build it too. Check it with `hadolint Dockerfile`.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG ORT_VERSION=1.31.1

LABEL org.opencontainers.image.title="aigw" \
      org.opencontainers.image.description="Open-source DICOM AI gateway: DICOM in, ONNX pipelines, DICOM results out" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Every RUN fails on the first failing command of a pipe.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3 is 3.12 on Ubuntu 24.04; curl serves the HEALTHCHECK. Distribution
# packages follow the base image's security updates rather than fixed versions.
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip

WORKDIR /opt/aigw

# Dependencies first, from pyproject.toml alone, so that a code change does not
# reinstall them. The 'scale' extra (Celery, psycopg) lets the same image run
# `aigw worker` against RabbitMQ and PostgreSQL.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['scale']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "onnxruntime-gpu==${ORT_VERSION}" \
    && rm /tmp/requirements.txt

# onnxruntime-gpu and the base image must agree on the CUDA major, and every
# library its CUDA provider links must resolve (libcuda.so.1 comes from the
# host's driver at run time, so it is the one allowed to be missing here).
RUN set -e; \
    : "${CUDA_VERSION:?the base image sets no CUDA_VERSION: CUDA_IMAGE must be an nvidia/cuda image}"; \
    ort_cuda="$(python -c 'from onnxruntime.capi.build_and_package_info import cuda_version; print(cuda_version)')"; \
    if [ "${ort_cuda%%.*}" != "${CUDA_VERSION%%.*}" ]; then \
        echo "onnxruntime-gpu ${ORT_VERSION} is built for CUDA ${ort_cuda}, the base image has CUDA ${CUDA_VERSION}:" \
             "choose a CUDA_IMAGE of CUDA ${ort_cuda%%.*}" >&2; \
        exit 1; \
    fi; \
    provider="$(python -c 'import os, onnxruntime; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime_providers_cuda.so"))')"; \
    missing="$(ldd "$provider" | grep 'not found' | grep -v 'libcuda\.so\.1' || true)"; \
    if [ -n "$missing" ]; then \
        echo "libraries of onnxruntime's CUDA provider missing from the base image:" >&2; \
        echo "$missing" >&2; \
        exit 1; \
    fi; \
    ldconfig -p | grep 'libcudnn\.so\.9' > /dev/null || { echo "cuDNN 9 is missing from the base image (use a -cudnn- tag)" >&2; exit 1; }; \
    echo "onnxruntime-gpu ${ORT_VERSION}: CUDA ${ort_cuda} on base CUDA ${CUDA_VERSION}, cuDNN 9: OK"

COPY gateway ./gateway
COPY pipelines ./pipelines
RUN pip install --no-deps . && pip check

# Models are baked in and checked against their sha256 now, and every built-in
# pipeline must load (no "UNAVAILABLE"), so a broken image fails here, not at a site.
COPY exported_models ./exported_models
ENV AIGW_MODELS_DIR=/opt/aigw/exported_models
RUN aigw models verify \
    && aigw models list > /tmp/models.txt \
    && cat /tmp/models.txt \
    && if grep -q UNAVAILABLE /tmp/models.txt; then exit 1; fi \
    && rm /tmp/models.txt

# A fixed numeric user, so that Kubernetes' runAsNonRoot can check it and volume
# permissions (fsGroup, chown on the host) can name it.
RUN groupadd --system --gid 10001 aigw \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin aigw \
    && mkdir -p /data \
    && chown 10001:10001 /data

# Container defaults. Environment beats the configuration file, so these win
# over a mounted aigw.toml; pass an empty value (-e AIGW_DATA_DIR=) to let the
# file decide. The data dir is the volume; metrics, /healthz and /readyz must
# listen on all interfaces to be reachable from outside the container, so
# /metrics asks for the bearer token in /run/secrets/aigw-metrics-token (a
# Docker or Kubernetes secret; without it every scrape gets 401, the probes
# stay open). DICOM accepts callers from private networks only (RFC 1918; a
# published port keeps the caller's address): set AIGW_ALLOW_HOSTS to the
# scanner networks, and AIGW_ALLOW_AE to their AE titles.
ENV AIGW_DATA_DIR=/data \
    AIGW_METRICS_HOST=0.0.0.0 \
    AIGW_METRICS_AUTH=bearer \
    AIGW_METRICS_CREDENTIAL_FILE=/run/secrets/aigw-metrics-token \
    AIGW_ALLOW_HOSTS=10.0.0.0/8,172.16.0.0/12,192.168.0.0/16

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]

# 11112: DICOM (C-STORE, C-ECHO); 9110: /metrics, /healthz, /readyz.
EXPOSE 11112 9110

# Liveness of `aigw serve`. `aigw worker` serves the endpoints only with
# --metrics-port: run workers with --metrics-port 9110 (or set AIGW_METRICS_PORT
# to the port given) so that this check holds for them too.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS \"http://127.0.0.1:${AIGW_METRICS_PORT:-9110}/healthz\" || exit 1"]

ENTRYPOINT ["aigw"]
CMD ["serve"]
