# PostgreSQL for docker-compose.scale.yml (the replicas' shared metadata index), from Debian's package.
# Built with deploy/scale/ as the context.
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/ckpt-postgres \
 && chown postgres:postgres /var/lib/ckpt-postgres

COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh

USER postgres
ENV PGDATA=/var/lib/ckpt-postgres/data
VOLUME ["/var/lib/ckpt-postgres"]
EXPOSE 5432
# SIGINT is PostgreSQL's fast shutdown: sessions end, the data is written, the server stops.
STOPSIGNAL SIGINT
ENTRYPOINT ["postgres-entrypoint.sh"]
HEALTHCHECK --interval=3s --timeout=3s --start-period=60s --retries=5 \
    CMD ["sh", "-c", "pg_isready -q -h 127.0.0.1 -p 5432 -d \"${POSTGRES_DB:-ckpt}\" -U \"${POSTGRES_USER:-ckpt}\""]
