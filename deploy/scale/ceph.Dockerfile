# A single-node Ceph cluster with its S3 endpoint (radosgw) for docker-compose.scale.yml, from Debian's packages:
# one mon, one OSD (BlueStore on a sparse file in the volume), radosgw on port 7480.
# Built with scripts/services/ as the context: scripts/services/ceph-s3.sh (the tests' Ceph) is the entrypoint;
# its `serve` command creates the cluster in the volume on the first start and starts that same cluster again on
# every later one, then creates the bucket $BUCKET.
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ceph-mon ceph-osd radosgw curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY ceph-s3.sh /usr/local/bin/ceph-s3.sh

# AK and SK (the S3 user's keys) and BUCKET come from the compose file. In a container the daemons get the same
# PIDs on every start; CEPH_USE_RANDOM_NONCE keeps the mon from taking a restarted OSD for the one it replaced.
ENV RGW_BIND=0.0.0.0 RGW_PORT=7480 MON_PORT=6789 CEPH_USE_RANDOM_NONCE=1
VOLUME ["/var/lib/ckpt-ceph"]
EXPOSE 7480
ENTRYPOINT ["ceph-s3.sh", "serve", "/var/lib/ckpt-ceph/cluster"]
HEALTHCHECK --interval=5s --timeout=4s --start-period=120s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:7480/"]
