# aigw container image. GPU where the host offers one (run with --gpus all),
# CPU otherwise: onnxruntime-gpu falls back to the CPU provider by itself.
# Base: CUDA 12 runtime with cuDNN 9, what onnxruntime-gpu's default wheels need.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    AIGW_DATA_DIR=/data \
    AIGW_MODELS_DIR=/opt/aigw/exported_models \
    AIGW_METRICS_HOST=0.0.0.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/aigw
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY pipelines ./pipelines
COPY exported_models ./exported_models
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/aigw models verify
ENV PATH=/opt/venv/bin:$PATH

RUN useradd --system --uid 10001 --home-dir /data aigw \
    && mkdir -p /data && chown aigw /data
USER aigw
VOLUME ["/data"]
EXPOSE 11112 9110

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9110/healthz || exit 1

ENTRYPOINT ["aigw"]
CMD ["serve"]
