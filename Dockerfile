# The punchline rendezvous server in a small image.
#
#   docker build -t punchline-rendezvous .
#   docker run -d --name rendezvous -p 7425-7427:7425-7427 punchline-rendezvous
#
# Options as environment variables (docker run -e PUNCHLINE_WAIT_TTL=900 …) or as
# arguments after the image name; `docker run --rm punchline-rendezvous --help`.
# Peers must reach both ports with their own addresses: publish them directly
# (no proxy that rewrites source addresses in front of the server).

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p punchline-rendezvous \
    && install -m 755 target/release/rendezvous /rendezvous

# glibc, libgcc and CA roots only; runs as an unprivileged user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /rendezvous /usr/local/bin/rendezvous
ENV RUST_LOG=info
EXPOSE 7425/tcp 7426/tcp 7427/tcp
# The exec form makes the server PID 1, so `docker stop` (SIGTERM) reaches it and
# it tells waiting peers it is going away before it exits.
ENTRYPOINT ["/usr/local/bin/rendezvous"]
