#
# filmgate container images. Two targets from one file, both on Debian 12 (bookworm) with its Python 3.11:
#
#   scripts/build-image            # CPU image filmgate:local: makes the base images locally, then builds
#   scripts/build-image --cuda     # CUDA image filmgate:local-cuda (CUDA 13 + cuDNN 9 from NVIDIA's PyPI wheels)
#
# The base images are build arguments: BASE_IMAGE (the runtime: Debian with python3, the passwd tools and libopenjp2-7,
# OpenJPEG for the reduced-resolution JPEG 2000 decode) and
# BUILD_IMAGE (the same plus python3-venv). scripts/build-image makes one image with both from Debian's packages by
# debootstrap (no image registry needed) and passes it as both; any Debian bookworm image with those packages works.
# Plain `docker build` (BuildKit) with the base images already present:
#
#   DOCKER_BUILDKIT=1 docker build --network host --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
#     --build-arg BASE_IMAGE=filmgate-base:bookworm --build-arg BUILD_IMAGE=filmgate-build:bookworm -t filmgate .
#
# Multi-stage: the build stage makes one virtual environment with deploy/docker/install.sh (the same script CI runs
# in a clean venv): first the pinned dependencies of constraints/ (their own layer, reused until the pins change),
# then the gate itself with its models as package data. The runtime stage copies only that venv. No torch, no
# compilers, non-root user, the spool on a volume, a health check that does a C-ECHO and GET /healthz. The node
# reads /etc/filmgate/filmgate.yaml (FILMGATE_CONFIG); mount another file there to change it. The optional build
# secret `ca` is a CA bundle for pip (a network that inspects TLS); it never enters an image layer.

ARG BASE_IMAGE=filmgate-base:bookworm
ARG BUILD_IMAGE=filmgate-build:bookworm

# ---------------------------------------------------------------------------------------------------------------------
FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY deploy/docker/install.sh /usr/local/bin/filmgate-install
COPY constraints/ constraints/
RUN --mount=type=secret,id=ca filmgate-install deps /src /opt/filmgate/venv
# Only what the wheel needs: the package sources (the gate, the training package without torch, the shipped models as
# package data) and its metadata (the README is the long description).
COPY pyproject.toml README.md ./
COPY service/ service/
COPY training/ training/
COPY models/ models/
RUN --mount=type=secret,id=ca filmgate-install package /src /opt/filmgate/venv

# ---------------------------------------------------------------------------------------------------------------------
# CUDA build: the same venv plus NVIDIA's CUDA 13 runtime, cuBLAS, cuFFT, cuRAND and cuDNN 9 wheels (constraints/
# cuda.txt: what onnxruntime-gpu[cuda,cudnn] of the pinned onnxruntime-gpu resolves to). No CUDA base image.
FROM build AS build-cuda
RUN --mount=type=secret,id=ca filmgate-install cuda /src /opt/filmgate/venv

# ---------------------------------------------------------------------------------------------------------------------
# onnxruntime's CUDA provider finds the wheels' libraries through LD_LIBRARY_PATH (checked with ldd: only the
# driver's libcuda.so.1 is left to the host, which the NVIDIA Container Toolkit mounts).
FROM ${BASE_IMAGE} AS runtime-cuda
LABEL org.opencontainers.image.title="filmgate-cuda" org.opencontainers.image.vendor="filmgate"
RUN groupadd --system --gid 10001 filmgate \
    && useradd --system --uid 10001 --gid filmgate --home-dir /var/lib/filmgate --shell /usr/sbin/nologin filmgate \
    && install -d -o filmgate -g filmgate /var/lib/filmgate
COPY --from=build-cuda /opt/filmgate/venv /opt/filmgate/venv
COPY deploy/filmgate/container.yaml /etc/filmgate/filmgate.yaml
ENV PATH=/opt/filmgate/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FILMGATE_CONFIG=/etc/filmgate/filmgate.yaml \
    LD_LIBRARY_PATH=/opt/filmgate/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/filmgate/venv/lib/python3.11/site-packages/nvidia/cudnn/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /var/lib/filmgate
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
# the CUDA libraries it runs on CPU and the node reports the provider in use (filmgate_model_info{provider=...}).
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="filmgate" org.opencontainers.image.vendor="filmgate"
RUN groupadd --system --gid 10001 filmgate \
    && useradd --system --uid 10001 --gid filmgate --home-dir /var/lib/filmgate --shell /usr/sbin/nologin filmgate \
    && install -d -o filmgate -g filmgate /var/lib/filmgate
COPY --from=build /opt/filmgate/venv /opt/filmgate/venv
COPY deploy/filmgate/container.yaml /etc/filmgate/filmgate.yaml
ENV PATH=/opt/filmgate/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FILMGATE_CONFIG=/etc/filmgate/filmgate.yaml
WORKDIR /var/lib/filmgate
VOLUME ["/var/lib/filmgate"]
USER 10001:10001
EXPOSE 11112 9108
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["filmgate", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["filmgate"]
CMD ["serve"]
