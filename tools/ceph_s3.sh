#!/usr/bin/env bash
# ceph_s3.sh start|stop|rgw-stop|rgw-start|env -- a throwaway single-host Ceph (1 mon, 1 OSD, [mgr], RGW)
# bound to 127.0.0.1 only: the real S3 server the shared-tier tests and tools/bench_shared.py run against.
# Prereq (Debian 12): apt-get install -y --no-install-recommends ceph-mon ceph-osd radosgw ceph-common curl
#                     (+ ceph-mgr if WITH_MGR=1); run as root (or a user who may start the daemons).
#   start      make the cluster in $CEPH_DIR (default ./cephci), the S3 user and bucket; write $CEPH_DIR/env
#   stop       stop the daemons this script started (by pid file) and delete $CEPH_DIR
#   rgw-stop   stop only the gateway (the cluster stays): the shared tier becomes unreachable
#   rgw-start  start the gateway again and wait until it answers
#   env        print the export lines of the running server (TIERSTORE_TEST_S3_*)
# Ports: RGW_PORT (7480), MON_PORT (3300). Keys: S3_ACCESS_KEY, S3_SECRET_KEY; bucket: S3_BUCKET.
set -euo pipefail
D=${CEPH_DIR:-${RUNNER_TEMP:-$PWD}/cephci}
PORT=${RGW_PORT:-7480}
MON_PORT=${MON_PORT:-3300}
STORE=${OSD_STORE:-bluestore}          # bluestore = sparse file on disk; memstore = RAM (faster, RSS grows with data)
AK=${S3_ACCESS_KEY:-ciaccesskey}; SK=${S3_SECRET_KEY:-cisecretkey123}
BUCKET=${S3_BUCKET:-tierstore-ci}
C="-c $D/ceph.conf"
uuid() { cat /proc/sys/kernel/random/uuid; }
fail() { echo "ceph-s3: $*" >&2; tail -n 30 "$D"/log/*.log >&2 || true; exit 1; }

stop_daemon() {  # stop one daemon we started, by its pid file
  f=$D/run/$1.pid; [ -f "$f" ] || return 0; p=$(cat "$f")
  kill -TERM "$p" 2>/dev/null || { rm -f "$f"; return 0; }
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$p" 2>/dev/null || true
  rm -f "$f"
}

stop() {  # stop only the daemons we started, then delete everything
  for n in client.rgw.ci mgr.x osd.0 mon.a; do stop_daemon "$n"; done
  rm -rf "$D"
}

rgw_wait() {
  for _ in $(seq 120); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && return 0; sleep 0.25; done
  fail "radosgw does not answer on 127.0.0.1:$PORT"
}

rgw_start() { radosgw $C -n client.rgw.ci; rgw_wait; }

env_lines() {
  cat <<ENV
export TIERSTORE_TEST_S3_ENDPOINT=http://127.0.0.1:$PORT
export TIERSTORE_TEST_S3_BUCKET=$BUCKET
export TIERSTORE_TEST_S3_ACCESS_KEY=$AK
export TIERSTORE_TEST_S3_SECRET_KEY=$SK
export TIERSTORE_TEST_CEPH_DIR=$D
ENV
}

start() {
  rm -rf "$D"; mkdir -p "$D"/{mon,osd/ceph-0,mgr/ceph-x,rgw,run,log,crash}
  FSID=$(uuid)
  cat > "$D/ceph.conf" <<CONF
[global]
fsid = $FSID
mon_host = v2:127.0.0.1:$MON_PORT
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv6 = false
ms_bind_msgr1 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = $D/keyring
run_dir = $D/run
admin_socket = $D/run/\$name.asok
pid_file = $D/run/\$name.pid
log_file = $D/log/\$name.log
crash_dir = $D/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 1000
mon_data_avail_warn = 2
[mon]
mon_data = $D/mon/\$cluster-\$id
keyring = \$mon_data/keyring
mgr_initial_modules = iostat
[mgr]
mgr_data = $D/mgr/\$cluster-\$id
keyring = \$mgr_data/keyring
[osd]
osd_data = $D/osd/\$cluster-\$id
keyring = \$osd_data/keyring
osd_objectstore = $STORE
osd_memory_target = 939524096
bluestore_block_path = $D/osd/block.img
bluestore_block_create = true
bluestore_block_size = 10737418240
bluestore_fsck_on_mkfs = false
memstore_device_bytes = 2147483648
[client.rgw.ci]
rgw_frontends = beast endpoint=127.0.0.1:$PORT tcp_nodelay=1
rgw_data = $D/rgw
keyring = $D/rgw/keyring
CONF
  # keys + monitor
  ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$D/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
  ceph-mon $C --mkfs -i a --monmap "$D/monmap" --keyring "$D/keyring"
  ceph-mon $C -i a
  for _ in $(seq 60); do ceph $C --connect-timeout 5 mon stat >/dev/null 2>&1 && break; sleep 0.5; done
  ceph $C --connect-timeout 5 mon stat >/dev/null || fail "mon did not start"
  # optional manager (not needed for S3 I/O; costs ~300 MB RSS)
  if [ "${WITH_MGR:-0}" = 1 ]; then
    ceph $C auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' > "$D/mgr/ceph-x/keyring"
    ceph-mgr $C -i x
  fi
  # one OSD
  OSD_UUID=$(uuid); ID=$(ceph $C osd new "$OSD_UUID")     # -> 0
  ceph $C auth get-or-create osd.$ID mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *' > "$D/osd/ceph-$ID/keyring"
  ceph-osd $C -i "$ID" --mkfs --osd-uuid "$OSD_UUID" >/dev/null 2>&1 || fail "osd mkfs failed"
  ceph-osd $C -i "$ID"
  for _ in $(seq 120); do ceph $C osd stat 2>/dev/null | grep -q " 1 up" && break; sleep 0.5; done
  ceph $C osd stat | grep -q " 1 up" || fail "osd did not come up"
  # RADOS gateway + S3 user + bucket
  ceph $C auth get-or-create client.rgw.ci mon 'allow rw' osd 'allow rwx' mgr 'allow rw' > "$D/rgw/keyring"
  rgw_start
  radosgw-admin $C user create --uid=ci --display-name=ci --access-key="$AK" --secret="$SK" >/dev/null
  curl -sSf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AK:$SK" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
       -X PUT "http://127.0.0.1:$PORT/$BUCKET" >/dev/null || fail "bucket create failed"
  env_lines > "$D/env"
  echo "S3 endpoint http://127.0.0.1:$PORT bucket=$BUCKET (exports in $D/env)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  rgw-stop) stop_daemon client.rgw.ci ;;
  rgw-start) rgw_start ;;
  env) cat "$D/env" ;;
  *) echo "usage: $0 start|stop|rgw-stop|rgw-start|env" >&2; exit 2 ;;
esac
