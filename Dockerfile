# sdgate's image: build with `docker build -t sdgate:0.1.0 .` (BuildKit).
# Stage 1 compiles the release binary from the locked dependencies; stage 2 is
# distroless (glibc, CA certificates, no shell), running as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sdgate \
    && cp target/release/sdgate /usr/local/bin/sdgate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/sdgate /usr/local/bin/sdgate
# distroless's `nonroot` user; deploy/sdgate.yaml runs it as the same uid.
USER 65532:65532
# Clients (listen) and the admin listener (/metrics, /healthz, /readyz, /status).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/sdgate"]
