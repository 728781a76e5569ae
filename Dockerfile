# The catalog image: built in one stage, run from a small one (the binary and CA certificates).
#   docker build -t catalog .
#   docker run -p 8080:8080 catalog serve --demo --addr 0.0.0.0:8080
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin catalog \
 && cp target/release/catalog /catalog

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/catalog \
 && chown 65532:65532 /var/lib/catalog
COPY --from=build /catalog /usr/local/bin/catalog
USER 65532:65532
ENV CATALOG_DATA_DIR=/var/lib/catalog \
    CATALOG_ADDR=0.0.0.0:8080
VOLUME /var/lib/catalog
EXPOSE 8080
ENTRYPOINT ["catalog"]
CMD ["serve"]
