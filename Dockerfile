# syntax=docker/dockerfile:1
#
# filmgate container images. Two targets from one file:
#
#   docker build -t filmgate .                               # default: CPU runtime on python:3.11-slim
#   docker build --target runtime-cuda -t filmgate:cuda .    # CUDA runtime: onnxruntime-gpu with CUDA 13 + cuDNN 9
#
# Both are multi-stage: the build stage makes one virtual environment with deploy/docker/install.sh (the same script
# CI runs in a clean venv, since no Docker engine runs there), the runtime stage copies only that venv and the
# shipped models. No torch, no compilers, non-root user, the spool on a volume, a health check that does a C-ECHO and
# GET /healthz. The node reads /etc/filmgate/filmgate.yaml (FILMGATE_CONFIG); mount another file there to change it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# Only what the wheel needs: the package sources (the gate, the training package without torch, the shipped models as
# package data) and its metadata (the README is the long description).
COPY pyproject.toml README.md ./
COPY service/ service/
COPY training/ training/
COPY models/ models/
COPY deploy/docker/install.sh /usr/local/bin/filmgate-install
RUN filmgate-install /src /opt/filmgate/venv

# ---------------------------------------------------------------------------------------------------------------------
# CUDA build: the venv must be made with the Python of the image it runs on (Ubuntu 24.04: Python 3.12).
FROM ${CUDA_IMAGE} AS build-cuda
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY training/ training/
COPY models/ models/
COPY deploy/docker/install.sh /usr/local/bin/filmgate-install
RUN filmgate-install /src /opt/filmgate/venv python3

# ---------------------------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime-cuda
ENV DEBIAN_FRONTEND=noninteractive
# The interpreter the venv was built with; nothing else (CUDA and cuDNN come with the base image).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libopenjp2-7 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 filmgate \
    && useradd --system --uid 10001 --gid filmgate --home-dir /var/lib/filmgate --shell /usr/sbin/nologin filmgate \
    && install -d -o filmgate -g filmgate /var/lib/filmgate
COPY --from=build-cuda /opt/filmgate/venv /opt/filmgate/venv
COPY models/ /opt/filmgate/models/
COPY deploy/filmgate/container.yaml /etc/filmgate/filmgate.yaml
ENV PATH=/opt/filmgate/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FILMGATE_CONFIG=/etc/filmgate/filmgate.yaml \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/filmgate
VOLUME ["/var/lib/filmgate"]
USER 10001:10001
# DICOM (C-STORE, C-ECHO) and HTTP (/metrics, /healthz, /readyz)
EXPOSE 11112 9108
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["filmgate", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["filmgate"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------------------------------
# Default target (last stage): CPU runtime. onnxruntime-gpu is what pyproject.toml installs on Linux x86_64; without
# a GPU it runs on CPU and the node reports the provider in use (filmgate_model_info{provider=...}).
FROM ${PYTHON_IMAGE} AS runtime
# libopenjp2: OpenJPEG for the reduced-resolution JPEG 2000 decode (filmgate.codecs, through glymur).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopenjp2-7 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 filmgate \
    && useradd --system --uid 10001 --gid filmgate --home-dir /var/lib/filmgate --shell /usr/sbin/nologin filmgate \
    && install -d -o filmgate -g filmgate /var/lib/filmgate
COPY --from=build /opt/filmgate/venv /opt/filmgate/venv
COPY models/ /opt/filmgate/models/
COPY deploy/filmgate/container.yaml /etc/filmgate/filmgate.yaml
ENV PATH=/opt/filmgate/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FILMGATE_CONFIG=/etc/filmgate/filmgate.yaml
WORKDIR /opt/filmgate
VOLUME ["/var/lib/filmgate"]
USER 10001:10001
EXPOSE 11112 9108
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["filmgate", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["filmgate"]
CMD ["serve"]
