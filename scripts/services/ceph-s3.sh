#!/usr/bin/env bash
# A throwaway single-node Ceph cluster with an S3 endpoint, for the S3 blob store's tests (tests/_services.py):
# one mon, one OSD (BlueStore on a sparse file), radosgw, as plain processes: no systemd, no containers, no root-only
# paths. After the ceph-s3 tool (start.sh / stop.sh) in the shared tools folder beside this repo, whose
# configuration, start order and waits this keeps; only the two commands became one script.
#
#   ceph-s3.sh start DIR   DIR is created afresh; prints the endpoint and keys; daemons' PIDs in DIR/*.pid
#   ceph-s3.sh stop DIR [--purge]   stops only the daemons start recorded (SIGTERM, then SIGKILL after 3 s)
#   ceph-s3.sh serve DIR   for a container (deploy/scale/): a cluster DIR that a former serve finished is started
#                          again as it was (its data kept), otherwise created as by start; then the bucket $BUCKET is
#                          created if missing, and the script stays in the foreground until a daemon exits or
#                          SIGTERM stops them all. DIR must be a directory below the volume, not its mount point.
#
# Environment: STORE=bluestore|memstore  RGW_PORT=27480  MON_PORT=27789  WITH_MGR=0|1  AK, SK (the S3 keys),
# RGW_BIND=127.0.0.1 (the S3 endpoint's address; 0.0.0.0 in a container), BUCKET (serve only).
# Installs Debian's ceph-mon ceph-osd radosgw when missing (needs root, as apt-get does).
set -euo pipefail

stop() {
  local dir pids=() f
  dir=$(realpath -m "${1:?usage: ceph-s3.sh stop DIR [--purge]}")
  for f in rgw mgr.x osd.0 mon.a; do
    [ -f "$dir/$f.pid" ] && pids+=("$(cat "$dir/$f.pid")") && rm -f "$dir/$f.pid"
  done
  if [ ${#pids[@]} -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null || true
    alive() { local p; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
    for _ in $(seq 30); do alive || break; sleep 0.1; done
    kill -9 "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do alive || break; sleep 0.1; done   # SIGKILL is async: wait for exit
  fi
  if [ "${2:-}" = --purge ]; then rm -rf "$dir"; fi
  return 0
}

start() {
  if ! command -v radosgw >/dev/null || ! command -v ceph-mon >/dev/null || ! command -v ceph-osd >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        ceph-mon ceph-osd radosgw; } >&2 || { echo "could not install ceph-mon ceph-osd radosgw" >&2; exit 2; }
  fi
  DIR=$(realpath -m "${1:?usage: ceph-s3.sh start DIR (an absolute or relative path; created afresh)}")
  local store=${STORE:-bluestore} rgw_port=${RGW_PORT:-27480} mon_port=${MON_PORT:-27789} with_mgr=${WITH_MGR:-0}
  local rgw_bind=${RGW_BIND:-127.0.0.1}
  local ak=${AK:-testaccesskey} sk=${SK:-testsecretkey}
  ms() { echo $(( $(date +%s%N) / 1000000 )); }
  T0=$(ms); step() { local d=$(( $(ms) - T0 )); printf '[%d.%03ds] %s\n' $((d/1000)) $((d%1000)) "$*"; }
  # wait_for SECONDS CMD...: poll CMD until it succeeds or fail the script
  wait_for() { local end=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || { echo "timeout waiting for: $*" >&2; return 1; }; sleep 0.3; done; }

  trap 'echo "start failed at line $LINENO: $BASH_COMMAND; see $DIR/log" >&2; stop "$DIR"' ERR
  stop "$DIR" 2>/dev/null || true; rm -rf "$DIR"; mkdir -p "$DIR"/{mon.a,osd.0,mgr.x,rgw,log}
  local fsid; fsid=$(cat /proc/sys/kernel/random/uuid)
  export CEPH_CONF="$DIR/ceph.conf"
  cat > "$CEPH_CONF" <<CONF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$mon_port
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
keyring = $DIR/keyring
run dir = $DIR
admin socket = $DIR/\$name.asok
log file = $DIR/log/\$name.log
ms bind ipv6 = false
ms bind msgr2 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
paxos propose interval = 0.05
paxos min wait = 0.01
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 1
osd objectstore = $store
osd data = $DIR/\$name
memstore device bytes = 6442450944
bluestore block create = true
bluestore block size = 21474836480
bluestore block db create = false
bluestore block wal create = false
osd memory target = 939524096
bluestore cache autotune = false
bluestore cache size = 134217728
osd max object size = 134217728
# OSD must not send mon commands during init: its MonClient may still have a zero fsid
# ("wrong fsid" race seen 1 in 5 starts), so place it in CRUSH from this script instead
osd class update on start = false
osd crush update on start = false
[mon.a]
mon data = $DIR/mon.a
[mgr.x]
mgr data = $DIR/mgr.x
[client.rgw.a]
rgw frontends = beast endpoint=$rgw_bind:$rgw_port
rgw data = $DIR/rgw
rgw enable usage log = false
rgw thread pool size = 64
# Deleted objects' data is reclaimed within seconds, not after RGW's default two hours: the sparse OSD is 20 GB,
# and the benchmark (bench/s3.py) writes and deletes more than that in one run.
rgw gc obj min wait = 0
rgw gc processor period = 5
CONF
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$DIR/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' \
    >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$mon_port]" "$DIR/monmap" >/dev/null
  ceph-mon --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring" 2>>"$DIR/log/mkfs.err"
  step "mon mkfs done"
  nohup ceph-mon -f -i a >"$DIR/log/mon.a.out" 2>&1 & echo $! > "$DIR/mon.a.pid"
  wait_for 60 timeout 5 ceph -s
  step "mon up (pid $(cat "$DIR/mon.a.pid"))"

  if [ "$with_mgr" = 1 ]; then
    nohup ceph-mgr -f -i x >"$DIR/log/mgr.x.out" 2>&1 & echo $! > "$DIR/mgr.x.pid"
  fi

  local osd_uuid osd_id
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  osd_id=$(ceph osd new "$osd_uuid")
  ceph osd crush add "osd.$osd_id" 1.0 root=default host=localhost >/dev/null 2>&1
  ceph-osd -i "$osd_id" --mkfs --osd-uuid "$osd_uuid" >"$DIR/log/osd.mkfs.out" 2>&1
  step "osd.$osd_id mkfs ($store) done"
  nohup ceph-osd -f -i "$osd_id" >"$DIR/log/osd.0.out" 2>&1 & echo $! > "$DIR/osd.0.pid"
  osd_up() { ceph osd dump 2>/dev/null | grep -q "^osd.$osd_id up"; }
  wait_for 90 osd_up
  retry() { local n=$1 i; shift; for i in $(seq "$n"); do "$@" >/dev/null 2>>"$DIR/log/retry.err" && return 0; sleep 1; done; "$@"; }
  step "osd.$osd_id up (pid $(cat "$DIR/osd.0.pid"))"

  # pre-create RGW data/index pools so the first bucket/PUT is not slowed by pool creation
  local p
  for p in default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec; do
    retry 5 ceph osd pool create "$p" 8; retry 5 ceph osd pool application enable "$p" rgw; done
  step "rgw pools created"
  nohup radosgw -f -n client.rgw.a >"$DIR/log/rgw.out" 2>&1 & echo $! > "$DIR/rgw.pid"
  port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$rgw_port") 2>/dev/null; }
  wait_for 90 port_open
  step "radosgw listening on 127.0.0.1:$rgw_port (pid $(cat "$DIR/rgw.pid"))"
  retry 10 radosgw-admin user create --uid=test --display-name=test --access-key="$ak" --secret-key="$sk"
  step "S3 user created; endpoint=http://127.0.0.1:$rgw_port access=$ak secret=$sk"
}

# resume DIR: start the daemons of a cluster that start made in DIR (the same ports and keys), keeping its data.
resume() {
  DIR=$(realpath -m "$1")
  export CEPH_CONF="$DIR/ceph.conf"
  local rgw_port
  rgw_port=$(sed -n 's/^rgw frontends = beast endpoint=.*:\([0-9]*\)$/\1/p' "$CEPH_CONF")
  wait_for() { local end=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || { echo "timeout waiting for: $*" >&2; return 1; }; sleep 0.3; done; }
  # PID files a killed container left behind name processes of another PID namespace: never signal them.
  rm -f "$DIR"/*.pid
  nohup ceph-mon -f -i a >>"$DIR/log/mon.a.out" 2>&1 & echo $! > "$DIR/mon.a.pid"
  wait_for 60 timeout 5 ceph -s
  nohup ceph-osd -f -i 0 >>"$DIR/log/osd.0.out" 2>&1 & echo $! > "$DIR/osd.0.pid"
  osd_up() { ceph osd dump 2>/dev/null | grep -q "^osd.0 up"; }
  wait_for 90 osd_up
  nohup radosgw -f -n client.rgw.a >>"$DIR/log/rgw.out" 2>&1 & echo $! > "$DIR/rgw.pid"
  port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$rgw_port") 2>/dev/null; }
  wait_for 90 port_open
  echo "resumed: mon, osd.0 and radosgw on port $rgw_port from $DIR"
}

# stop_in_order DIR: radosgw, then the OSD while the mon still runs (so that it can report itself down and the
# next start is not taken for the old instance), then the mon; each gets 10 s after SIGTERM before SIGKILL.
stop_in_order() {
  local f pid
  for f in rgw mgr.x osd.0 mon.a; do
    [ -f "$1/$f.pid" ] || continue
    pid=$(cat "$1/$f.pid"); rm -f "$1/$f.pid"
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
}

serve() {
  local dir; dir=$(realpath -m "${1:?usage: ceph-s3.sh serve DIR}")
  if [ -f "$dir/served" ]; then resume "$dir"; else start "$dir"; touch "$dir/served"; fi
  trap - ERR
  trap 'stop_in_order "$dir"; exit 0' TERM INT
  if [ -n "${BUCKET:-}" ]; then
    local port url
    port=$(sed -n 's/^rgw frontends = beast endpoint=.*:\([0-9]*\)$/\1/p' "$dir/ceph.conf")
    url="http://127.0.0.1:$port/$BUCKET"
    # curl signs the request (SigV4) itself; 409 BucketAlreadyOwnedByYou is the bucket from a former start.
    local code
    code=$(curl -sS -m 60 -o "$dir/log/bucket.out" -w '%{http_code}' -X PUT -H 'Content-Length: 0' \
      -H "x-amz-content-sha256: $(printf '' | sha256sum | cut -d' ' -f1)" --aws-sigv4 "aws:amz:us-east-1:s3" --user "${AK:-testaccesskey}:${SK:-testsecretkey}" "$url") || true
    case "$code" in
      200|409) echo "bucket $BUCKET ready ($code)" ;;
      *) echo "could not create the bucket $BUCKET: HTTP $code $(cat "$dir/log/bucket.out")" >&2; stop "$dir"; exit 1 ;;
    esac
  fi
  echo "serving; SIGTERM stops the daemons"
  # In the foreground until one daemon exits (the container then stops and its restart policy applies).
  wait -n || true
  echo "a daemon exited; stopping the others" >&2
  stop_in_order "$dir"
  exit 1
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  serve) shift; serve "$@" ;;
  *) echo "usage: ceph-s3.sh start DIR | stop DIR [--purge] | serve DIR" >&2; exit 64 ;;
esac
