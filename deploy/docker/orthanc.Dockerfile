# Orthanc from Debian's package on the local Debian base (scripts/build-image --stack), for the Compose stack's two
# PACS where no image registry can be reached (deploy/compose.local.yaml). Reads one file, /etc/orthanc/orthanc.json
# (Compose mounts deploy/orthanc/hospital.json or research.json there); stores under /var/lib/orthanc/db (a volume).
ARG BASE_IMAGE=filmgate-base:bookworm
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="filmgate-orthanc" org.opencontainers.image.vendor="filmgate"
# Debian's archive drops superseded versions, so apt pins would break rebuilds; the suite of the base is the pin.
# The package's system user, made first with a fixed id so USER can be numeric (the volume's files keep one owner).
# hadolint ignore=DL3008
RUN groupadd --system --gid 990 orthanc \
    && useradd --system --uid 990 --gid orthanc --home-dir /var/lib/orthanc --shell /usr/sbin/nologin orthanc \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends orthanc \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o orthanc -g orthanc /var/lib/orthanc/db
USER 990:990
VOLUME ["/var/lib/orthanc/db"]
EXPOSE 4242 8042
ENTRYPOINT ["/usr/sbin/Orthanc"]
CMD ["/etc/orthanc/orthanc.json"]
