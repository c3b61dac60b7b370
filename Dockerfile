# VisitMe: both binaries in one small image. Build: docker build -t visitme .
# Run: `docker run visitme web` or `docker run visitme worker` (see docker-compose.yml).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# SQLX_OFFLINE comes from .cargo/config.toml: the build never needs a database.
RUN cargo build --release --locked -p web -p jobs --bins \
 && cp target/release/web target/release/worker /usr/local/bin/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 visitme
COPY --from=build /usr/local/bin/web /usr/local/bin/worker /usr/local/bin/
USER visitme
ENV BIND=0.0.0.0:8080
EXPOSE 8080
CMD ["web"]
