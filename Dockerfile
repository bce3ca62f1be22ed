# sdgate's image: build with `docker build -t sdgate:0.1.0 .` (BuildKit).
# Stage 1 builds the profile-guided release binary from the locked
# dependencies (benches/pgo.sh: an instrumented build, 30 s of training on
# loopback inside the build, then the optimised build: about 22% less CPU per
# proxied request than the plain release build, and two release builds of
# time). `--build-arg PGO=0` builds the plain release binary instead.
# Stage 2 is distroless (glibc, CA certificates, no shell), running as a
# non-root user.
FROM rust:1-bookworm AS build
ARG PGO=1
# The training's load generators and llvm-profdata (pgo.sh would install them too).
RUN if [ "$PGO" = 1 ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk hey curl \
        && rm -rf /var/lib/apt/lists/* \
        && rustup component add llvm-tools; \
    fi
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    if [ "$PGO" = 1 ]; then \
        bash benches/pgo.sh && cp target/pgo/release/sdgate /usr/local/bin/sdgate; \
    else \
        cargo build --release --locked --bin sdgate && cp target/release/sdgate /usr/local/bin/sdgate; \
    fi

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/sdgate /usr/local/bin/sdgate
# distroless's `nonroot` user; deploy/sdgate.yaml runs it as the same uid.
USER 65532:65532
# Clients (listen) and the admin listener (/metrics, /healthz, /readyz, /status).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/sdgate"]
