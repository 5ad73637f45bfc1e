# syntax=docker/dockerfile:1
# The one trackgate image: a single `trackgate` binary that carries every role
# (operator, listen, run, simulate, decode, crd). The chart runs it as the operator, and the
# operator starts listener pods with this same image.
#
#   docker build -t trackgate:dev .
#   docker run --rm trackgate:dev --version
#
# No container engine runs in this project's CI, so this file is reviewed, not built, there.

# === Build ===
# Same Debian release as the runtime image below, so the binary links against the same glibc.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is copied out of the
# cache because cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p trackgate \
    && install -D -m 0755 target/release/trackgate /out/trackgate

# === Runtime ===
# distroless/cc: glibc, libgcc, CA certificates and tzdata; no shell, no package manager.
# The :nonroot tag runs as uid/gid 65532, the ids the Helm chart and the operator's listener
# pods set in their securityContext.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/trackgate /usr/local/bin/trackgate
USER 65532:65532
# Listener admin port (9090), operator admin port (8080); device ports come from each pool.
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/trackgate"]
CMD ["--help"]
