# onnx-auditor as a long-lived gRPC service.
#
#   docker build -t onnx-auditor .
#   docker run --gpus all -p 50051:50051 -v auditor-store:/var/lib/auditor onnx-auditor
#
# Build arguments (docs/deploy.md):
#   BASE_IMAGE  the image to build on; any Debian or Ubuntu with Python >= 3.11 works (CI builds on
#               a debootstrapped Debian bookworm, scripts/container_check.py).
#   PIP_CERT    a CA bundle for pip during the build, for builds behind a TLS-intercepting proxy;
#               mount it for the build only (buildah/podman: --volume BUNDLE:PATH:ro, docker:
#               a bind mount), so that nothing of it lands in the image.
#   EXTRAS      the package's extras to install (default "gpu"); "gpu,ray" for `auditor serve --ray`.
#
# Base image: onnxruntime-gpu 1.31.1 is built against CUDA 13 and cuDNN 9 (it dlopens
# libcublasLt.so.13, libcudnn.so.9). NVIDIA's "cudnn-runtime" images ship exactly those runtime
# libraries and no compilers; Ubuntu 24.04 brings Python 3.12. Without a GPU (or without
# --gpus) onnxruntime falls back to the CPU and the report's "providers" says so.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}
ARG PIP_CERT=""
ARG EXTRAS="gpu"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/auditor \
    PATH=/opt/auditor/bin:$PATH \
    AUDITOR_DATA_DIR=/var/lib/auditor/data

# Ubuntu's python3 is pinned by the base image's release; apt pins would only break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY auditor ./auditor
COPY trainers ./trainers
# EXTRAS defaults to gpu: CuPy, so states are counted on the GPU that runs the model. The
# extras' version bounds live in pyproject.toml, which hadolint does not read.
# hadolint ignore=DL3013
RUN pip install ${PIP_CERT:+--cert "$PIP_CERT"} ".${EXTRAS:+[$EXTRAS]}" && rm -rf /src

RUN groupadd --system --gid 10001 auditor \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/auditor auditor \
    && mkdir -p /var/lib/auditor/data \
    && chown -R 10001:10001 /var/lib/auditor
USER 10001:10001
WORKDIR /home/auditor

# Reports (reports.sqlite3), uploaded models (models/<sha256>/) and downloaded datasets (data/).
VOLUME ["/var/lib/auditor"]
# 50051: gRPC; 9464: Prometheus metrics, served when started with --metrics-port 9464.
EXPOSE 50051 9464

# The standard grpc.health.v1 check; it stays open when the server wants a token. With TLS on,
# override it to add --tls-ca.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "auditor.service.client", "health", "--server", "127.0.0.1:50051", "--timeout", "3"]

# Extra flags (--tls-cert, --token-file, --max-concurrent ...) go after the image name.
ENTRYPOINT ["auditor", "serve", "--host", "0.0.0.0", "--port", "50051", "--store", "/var/lib/auditor"]
