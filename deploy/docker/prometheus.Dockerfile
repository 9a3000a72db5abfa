# Prometheus (server and promtool) from Debian's package on the local Debian base (scripts/build-image --stack), for
# the Compose stack where no image registry can be reached (deploy/compose.local.yaml). Compose passes the flags
# (--config.file, --storage.tsdb.path=/prometheus, ...), as for the upstream image.
ARG BASE_IMAGE=filmgate-base:bookworm
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="filmgate-prometheus" org.opencontainers.image.vendor="filmgate"
# The package's system user, made first with a fixed id so USER can be numeric (the volume's files keep one owner).
# hadolint ignore=DL3008
RUN groupadd --system --gid 991 prometheus \
    && useradd --system --uid 991 --gid prometheus --home-dir /var/lib/prometheus --shell /usr/sbin/nologin prometheus \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o prometheus -g prometheus /prometheus
USER 991:991
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
