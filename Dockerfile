# syntax=docker/dockerfile:1
#
# The `tally` binary in a small Debian image. Built by docker-compose.yml for the three
# streaming services (`tally serve ingest|aggregator|rater`); any other subcommand runs
# too: `docker run --rm tally:local validate --config /etc/tally/tally.toml`.
#
#   docker build -t tally:local --build-arg TALLY_COMMIT=$(git rev-parse --short=12 HEAD) .

# --- build -----------------------------------------------------------------------
# Same Debian release as the runtime stage, so the binary links against the libssl3
# the runtime installs. The workspace is built with cargo 1.95.
FROM rust:1.95-bookworm AS build

# librdkafka is compiled from source by the rdkafka crate (its own configure + make,
# no cmake), against the system's OpenSSL and zlib. The rust image ships these
# already; listed so the build does not depend on that.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The commit the binary reports (`tally --version`, tally_build_info); the context has
# no .git: docker build --build-arg TALLY_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG TALLY_COMMIT=unknown
ENV TALLY_COMMIT=${TALLY_COMMIT}

# The registry and target directories are BuildKit cache mounts: a rebuild after a
# source change recompiles Tally's crates, not librdkafka and every dependency. The
# binary is copied out of the cached target directory, which the next stage cannot see.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tally \
    && install -m 0755 target/release/tally /usr/local/bin/tally

# --- run -------------------------------------------------------------------------
FROM debian:bookworm-slim

# libssl3 for librdkafka's TLS, ca-certificates for TLS to brokers and ClickHouse,
# curl for the compose healthchecks (GET /readyz).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl3 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tally \
    && useradd --system --uid 10001 --gid tally --home-dir /var/lib/tally \
        --create-home --shell /usr/sbin/nologin tally \
    && mkdir -p /etc/tally

COPY --from=build /usr/local/bin/tally /usr/local/bin/tally

USER tally:tally
WORKDIR /var/lib/tally

# 9101: ingest HTTP API and its /metrics; 9102, 9103: the aggregator's and the rater's
# /metrics, /healthz and /readyz.
EXPOSE 9101 9102 9103

ENTRYPOINT ["tally"]
CMD ["--help"]
