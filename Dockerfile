# cync-gateway's container image.
#
#   docker build -t cync-gateway:0.1.0 .                       # builds the binary too
#   podman build --target runtime-prebuilt --build-arg BASE=<image> \
#     [--build-arg BINARY=target/debug/cync-gateway] -t cync-gateway:test .
#                                                              # packs a binary built already
#
# The second form is for machines without a Rust base image (tests/packaging.rs uses it
# with a locally made Debian base).
ARG BASE=debian:bookworm-slim

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release --bin cync-gateway

FROM ${BASE} AS runtime-base
# A base that already has them (the test's, made offline) skips the download.
RUN (dpkg -s ca-certificates libssl3 >/dev/null 2>&1 \
     || (apt-get update \
         && apt-get install -y --no-install-recommends ca-certificates libssl3 \
         && rm -rf /var/lib/apt/lists/*)) \
 && groupadd --system --gid 10001 cync-gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cync-gateway --shell /usr/sbin/nologin cync-gateway \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/cync-gateway \
 && install -d -m 0755 /etc/cync-gateway
COPY config/gateway.toml /usr/share/doc/cync-gateway/gateway.toml
LABEL org.opencontainers.image.title="cync-gateway" \
      org.opencontainers.image.description="Strangler gateway for Cync devices: legacy passthrough and a reliable new path, shifted a percentage at a time" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT"
# Devices, and /metrics + /healthz + the status page.
EXPOSE 23779/tcp 9400/tcp
# The configuration (a file or a ConfigMap; edits hot-reload) and the state (latch, SLO state,
# audit log, the admin socket).
VOLUME ["/etc/cync-gateway", "/var/lib/cync-gateway"]
USER 10001:10001
# SIGTERM drains: the runtime's stop timeout must exceed shutdown.drain_timeout (30 s).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9400 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ' 200 ' <&3"]
ENTRYPOINT ["/usr/bin/cync-gateway"]
CMD ["run", "--config", "/etc/cync-gateway/gateway.toml"]

FROM runtime-base AS runtime-prebuilt
ARG BINARY=target/release/cync-gateway
COPY ${BINARY} /usr/bin/cync-gateway

FROM runtime-base AS runtime
COPY --from=build /src/target/release/cync-gateway /usr/bin/cync-gateway
