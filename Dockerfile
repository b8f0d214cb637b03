# Build: docker build -t ragchat .   (used by docker-compose.yml)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ragchat

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/ragchat /usr/local/bin/ragchat
COPY config ./config
ENV RAGCHAT_ENV=production
EXPOSE 8000
CMD ["ragchat", "serve"]
