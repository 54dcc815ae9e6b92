# haproxy in front of the ckpt-service replicas (docker-compose.scale.yml), from Debian's package.
# Built with scripts/services/ as the context: the same haproxy.sh writes the configuration here and in the tests.
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy \
 && rm -rf /var/lib/apt/lists/*

COPY haproxy.sh /usr/local/bin/haproxy.sh

# The configuration and the stats socket go to /tmp (a tmpfs in the compose file); haproxy needs no root for 8080.
USER haproxy
EXPOSE 8080
ENTRYPOINT ["haproxy.sh", "run", "/tmp/haproxy"]
# Docker's embedded DNS (127.0.0.11) re-resolves the replicas' names: a replica recreated with a new address is
# found again without restarting haproxy.
CMD ["--backend", "ckpt-1:8000", "--backend", "ckpt-2:8000", "--port", "8080", "--bind", "0.0.0.0", \
     "--resolver", "127.0.0.11:53"]
