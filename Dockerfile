# replisync in a container: built with the Rust toolchain, run from a slim Debian image as a
# non-root user. The health check is the binary itself (`replisync healthcheck`), no curl.
#   docker build -t replisync .
#   docker run -p 8080:8080 -e DATABASE_URL=postgres://... -e REPLISYNC_JWT_SECRET=... replisync
# With the embedded SQLite store, keep its data in a volume, and mount your mutators module:
#   docker run -p 8080:8080 -e REPLISYNC_JWT_SECRET=... \
#     -v replisync-data:/var/lib/replisync \
#     -v "$PWD/demo/public/mutators.js:/etc/replisync/mutators.js:ro" \
#     -e REPLISYNC_MUTATORS=/etc/replisync/mutators.js replisync

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY benches benches
RUN cargo build --release --locked --bin replisync

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /var/lib/replisync replisync
COPY --from=build /src/target/release/replisync /usr/local/bin/replisync
USER replisync
WORKDIR /var/lib/replisync
# Every address in the container; SQLite (the default store) under /var/lib/replisync, a volume
# so that the data outlives the container (mount a named volume there, as above).
ENV REPLISYNC_LISTEN=0.0.0.0:8080 \
    REPLISYNC_SQLITE_PATH=/var/lib/replisync/replisync.db
VOLUME ["/var/lib/replisync"]
EXPOSE 8080
# Liveness only: `/healthz` (the database answers). Load balancers route on `/readyz`.
HEALTHCHECK --interval=10s --timeout=6s --start-period=15s --retries=3 \
    CMD ["replisync", "healthcheck"]
# SIGTERM: drain (REPLISYNC_DRAIN_DELAY_SECS), then finish requests (REPLISYNC_SHUTDOWN_TIMEOUT_SECS).
STOPSIGNAL SIGTERM
ENTRYPOINT ["replisync"]
