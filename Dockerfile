# syntax=docker/dockerfile:1
#
# viewkeeper worker image: `docker build -t viewkeeper .`
# Used by docker-compose.yml; expects the config at /etc/viewkeeper/shop.toml and keeps its
# state store under /var/lib/viewkeeper (mount a volume there: the state store must survive
# restarts, or the worker rebuilds it from the sources).

# ---- build -------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
# cmake/pkg-config/libssl-dev/zlib1g-dev: for crates that build bundled C libraries (rdkafka's
# bundled librdkafka; rusqlite's bundled SQLite only needs the C compiler already here).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the build needs (keeps target/, .services/ and data out of the image).
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY connectors connectors
COPY projections projections
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin viewkeeper \
 && install -m 0755 target/release/viewkeeper /usr/local/bin/viewkeeper

# ---- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/viewkeeper --shell /usr/sbin/nologin viewkeeper \
 && mkdir -p /etc/viewkeeper /var/lib/viewkeeper \
 && chown viewkeeper:viewkeeper /var/lib/viewkeeper
COPY --from=build /usr/local/bin/viewkeeper /usr/local/bin/viewkeeper
USER viewkeeper
WORKDIR /var/lib/viewkeeper
VOLUME ["/var/lib/viewkeeper"]
ENTRYPOINT ["viewkeeper"]
CMD ["run", "--config", "/etc/viewkeeper/shop.toml", "--data-dir", "/var/lib/viewkeeper"]
