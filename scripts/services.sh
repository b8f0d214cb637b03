#!/usr/bin/env bash
# Real backing services for ragchat's development and tests, on loopback, without Docker.
#
#   scripts/services.sh start  [postgres|redis|mongo|cql ...]   # install what is missing, start, wait until ready
#   scripts/services.sh stop   [postgres|redis|mongo|cql ...]   # graceful shutdown, waits for the exit
#   scripts/services.sh status [postgres|redis|mongo|cql ...]   # "NAME: up URL" / "NAME: down"; exit 3 if any down
#   scripts/services.sh env    [postgres|redis|mongo|cql ...]   # "export NAME_URL=..." for each running one
#   scripts/services.sh urls   [postgres|redis|mongo|cql ...]   # the NAME_URL=... lines, running or not
#
# No names means all four. `start` prints one NAME_URL=... line per service on stdout
# (progress goes to stderr), is idempotent, and exits non-zero if a requested service
# does not come up in time (the tail of its log is printed). Typical use:
#
#   scripts/services.sh start && eval "$(scripts/services.sh env)"
#
# Services:
#   postgres  PostgreSQL from the distribution's binaries (apt-get install postgresql if missing),
#             run as the `postgres` user; role ragchat/ragchat (LOGIN CREATEDB), database ragchat.
#             DATABASE_URL=postgres://ragchat:ragchat@127.0.0.1:$PG_PORT/ragchat
#   redis     redis-server (apt-get install redis-server if missing), no persistence.
#             REDIS_URL=redis://127.0.0.1:$REDIS_PORT
#   mongo     FerretDB v1.24.2 (MongoDB wire protocol) with its SQLite backend, built from
#             scripts/ferretdb (a small main embedding FerretDB's library package).
#             MONGODB_URL=mongodb://127.0.0.1:$MONGO_PORT
#   cql       Apache Cassandra 5.0.x (jars from Maven Central via scripts/cassandra/pom.xml),
#             single node, run straight from the jars on Java 11/17.
#             SCYLLA_URL=127.0.0.1:$CQL_PORT
#
# Everything (data, logs, downloads, build caches, binaries) lives under $SERVICES_DIR,
# by default .services/ at the repository root (git-ignored). `rm -rf .services` resets all.
#
# Environment: PG_PORT (5432) REDIS_PORT (6379) MONGO_PORT (27017) CQL_PORT (9042)
#   CQL_STORAGE_PORT (7000, Cassandra's internode port) CQL_HEAP (1g)
#   PG_TIMEOUT (60) REDIS_TIMEOUT (30) MONGO_TIMEOUT (60) CQL_TIMEOUT (180): seconds to wait
#   for readiness after launch (installs, downloads and builds come on top).
#   SERVICES_DIR (<repo>/.services)

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPTS=$ROOT/scripts
SD=${SERVICES_DIR:-$ROOT/.services}

PG_PORT=${PG_PORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
MONGO_PORT=${MONGO_PORT:-27017}
CQL_PORT=${CQL_PORT:-9042}
CQL_STORAGE_PORT=${CQL_STORAGE_PORT:-7000}
CQL_HEAP=${CQL_HEAP:-1g}
PG_TIMEOUT=${PG_TIMEOUT:-60}
REDIS_TIMEOUT=${REDIS_TIMEOUT:-30}
MONGO_TIMEOUT=${MONGO_TIMEOUT:-60}
CQL_TIMEOUT=${CQL_TIMEOUT:-180}

PG_USER=ragchat
PG_PASSWORD=ragchat
PG_DB=ragchat
HOST=127.0.0.1

ALL_SERVICES=(postgres redis mongo cql)

log() { printf '[services] %s\n' "$*" >&2; }
now() { date +%s; }

url_of() {
    case $1 in
        postgres) echo "DATABASE_URL=postgres://$PG_USER:$PG_PASSWORD@$HOST:$PG_PORT/$PG_DB" ;;
        redis) echo "REDIS_URL=redis://$HOST:$REDIS_PORT" ;;
        mongo) echo "MONGODB_URL=mongodb://$HOST:$MONGO_PORT" ;;
        cql) echo "SCYLLA_URL=$HOST:$CQL_PORT" ;;
    esac
}

logfile_of() {
    if [[ $1 == postgres && -n ${PG_LOG:-} ]]; then echo "$PG_LOG"; else echo "$SD/log/$1.log"; fi
}

fail_with_log() { # service message: report, with the log lines of the latest start attempt
    local f
    f=$(logfile_of "$1")
    log "$1: $2"
    if [[ -s $f ]]; then
        log "$1: last lines of $f:"
        tac "$f" | sed '/^===== /q' | tac | tail -n 30 | sed 's/^/    /' >&2
    fi
    return 1
}

# ------------------------------------------------------------------ helpers

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        log "need root for: $*"
        return 1
    fi
}

apt_install() { # packages...
    local alog=$SD/log/apt.log
    log "installing $* with apt-get (log: $alog)"
    local opts=(-y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@" >>"$alog" 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$alog" 2>&1
        if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@" >>"$alog" 2>&1; then
            log "apt-get install $* failed; last lines of $alog:"
            tail -n 20 "$alog" | sed 's/^/    /' >&2
            return 1
        fi
    fi
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }

# pid_alive PIDFILE PATTERN: the pid in PIDFILE runs and its command line contains PATTERN.
pid_alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(head -n 1 "$1" 2>/dev/null)
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

# wait_pid_exit PID SECONDS: true once PID is gone.
wait_pid_exit() {
    local pid=$1 deadline=$(($(now) + $2))
    while kill -0 "$pid" 2>/dev/null; do
        [[ $(now) -ge $deadline ]] && return 1
        sleep 0.2
    done
}

# stop_pid NAME PIDFILE PATTERN SECONDS: SIGTERM, wait, SIGKILL as a last resort.
stop_pid() {
    local name=$1 pidfile=$2 pat=$3 secs=$4 pid
    if ! pid_alive "$pidfile" "$pat"; then
        rm -f "$pidfile"
        log "$name: not running"
        return 0
    fi
    pid=$(head -n 1 "$pidfile")
    log "$name: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    if ! wait_pid_exit "$pid" "$secs"; then
        log "$name: still running after ${secs}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        wait_pid_exit "$pid" 10
    fi
    rm -f "$pidfile"
    log "$name: stopped"
}

# launch_bg NAME PIDFILE CMD...: start CMD detached (own session, stdin closed), output
# appended to the service's log, its pid written to PIDFILE.
launch_bg() {
    local name=$1 pidfile=$2 lf
    shift 2
    lf=$(logfile_of "$name")
    printf '===== %s: starting %s\n' "$(date '+%F %T')" "$name" >>"$lf"
    rm -f "$pidfile"
    # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
    nohup setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" >>"$lf" 2>&1 </dev/null 9>&- &
    local _
    for _ in $(seq 1 50); do
        [[ -s $pidfile ]] && return 0
        sleep 0.1
    done
    return 1
}

find_python() {
    local p
    for p in "$(command -v python3 2>/dev/null)" /usr/bin/python3; do
        [[ -n $p && -x $p ]] && { echo "$p"; return 0; }
    done
    return 1
}

# wait_until NAME SECONDS PIDFILE PATTERN CHECK...: poll CHECK until it succeeds; give up
# early if the process died.
wait_until() {
    local name=$1 secs=$2 pidfile=$3 pat=$4
    shift 4
    local deadline=$(($(now) + secs))
    while true; do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [[ -n $pidfile ]] && ! pid_alive "$pidfile" "$pat"; then
            sleep 0.5
            "$@" >/dev/null 2>&1 && return 0
            fail_with_log "$name" "the server process exited during startup"
            return 1
        fi
        if [[ $(now) -ge $deadline ]]; then
            fail_with_log "$name" "not ready after ${secs}s"
            return 1
        fi
        sleep 0.5
    done
}

# ------------------------------------------------------------------ postgres

PG_BIN=
pg_find_bin() {
    local d v best='' bestv=0
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x $d/postgres && -x $d/initdb && -x $d/pg_ctl && -x $d/psql ]] || continue
        v=${d#/usr/lib/postgresql/}
        v=${v%%/*}
        [[ $v =~ ^[0-9]+$ ]] || continue
        if ((v > bestv)); then best=$d bestv=$v; fi
    done
    [[ -n $best ]] || return 1
    PG_BIN=$best
}

# PostgreSQL refuses to run as root: as root we run it as the `postgres` user, whose data
# folder must be reachable by that user. Where $SD can't be (e.g. under a 0700 /root), the
# data goes to /var/tmp instead.
PG_OS_USER=
PG_HOME=
PG_LOG=
pg_paths() {
    if [[ $(id -u) -eq 0 ]]; then
        PG_OS_USER=postgres
        PG_HOME=$SD/postgres
        mkdir -p "$PG_HOME"
        chown "$PG_OS_USER:" "$PG_HOME" 2>/dev/null
        if ! runuser -u "$PG_OS_USER" -- test -w "$PG_HOME" 2>/dev/null; then
            PG_HOME=/var/tmp/ragchat-services-$(printf '%s' "$SD" | md5sum | cut -c1-8)/postgres
            mkdir -p "$PG_HOME"
            chown "$PG_OS_USER:" "$PG_HOME"
        fi
    else
        PG_OS_USER=$(id -un)
        PG_HOME=$SD/postgres
        mkdir -p "$PG_HOME"
    fi
    PGDATA=$PG_HOME/data
    if [[ $PG_HOME == "$SD/postgres" ]]; then PG_LOG=$SD/log/postgres.log; else PG_LOG=$PG_HOME/postgres.log; fi
    if [[ ! -e $PG_LOG ]]; then
        touch "$PG_LOG"
        [[ $(id -u) -eq 0 ]] && chown "$PG_OS_USER:" "$PG_LOG"
    fi
}

as_pg() {
    if [[ $(id -u) -eq 0 ]]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi
}

pg_pid_alive() {
    local pid
    [[ -s $PGDATA/postmaster.pid ]] || return 1
    pid=$(head -n 1 "$PGDATA/postmaster.pid")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q postgres
}

pg_install() {
    pg_find_bin && return 0
    apt_install postgresql || return 1
    # The package may create and start a "main" cluster; don't let it sit on our port.
    if command -v pg_lsclusters >/dev/null; then
        pg_lsclusters -h 2>/dev/null | while read -r ver name port status _; do
            if [[ $status == online* ]]; then
                log "stopping the cluster $ver/$name that the postgresql package started (port $port)"
                pg_ctlcluster "$ver" "$name" stop || true
            fi
        done
    fi
    pg_find_bin || { log "postgres: no server binaries in /usr/lib/postgresql/*/bin after install"; return 1; }
}

pg_launch() {
    pg_install || return 1
    pg_paths
    if pg_pid_alive; then
        log "postgres: already running"
        return 0
    fi
    if port_open "$PG_PORT"; then
        log "postgres: port $PG_PORT is taken by another process (set PG_PORT)"
        return 1
    fi
    local lf
    lf=$(logfile_of postgres)
    if [[ ! -s $PGDATA/PG_VERSION ]]; then
        log "postgres: initdb $PGDATA"
        rm -rf "$PGDATA"
        mkdir -p "$PGDATA"
        [[ $(id -u) -eq 0 ]] && chown "$PG_OS_USER:" "$PGDATA"
        chmod 700 "$PGDATA"
        if ! as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust --no-locale -E UTF8 \
            --no-sync >>"$lf" 2>&1; then
            rm -rf "$PGDATA"
            fail_with_log postgres "initdb failed"
            return 1
        fi
        # The superuser may connect without a password from loopback; everyone else with one.
        as_pg tee "$PGDATA/pg_hba.conf" >/dev/null <<'EOF'
# Written by scripts/services.sh
host    all    postgres    127.0.0.1/32    trust
host    all    all         127.0.0.1/32    scram-sha-256
host    all    postgres    ::1/128         trust
host    all    all         ::1/128         scram-sha-256
EOF
        echo "include_if_exists = 'ragchat.conf'" | as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null
    fi
    # Rewritten at every start, so a new PG_PORT takes effect.
    as_pg tee "$PGDATA/ragchat.conf" >/dev/null <<EOF
# Written by scripts/services.sh at each start. For tests only: durability is off.
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = ''
max_connections = 300
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
timezone = 'UTC'
log_timezone = 'UTC'
EOF
    log "postgres: starting on $HOST:$PG_PORT (data: $PGDATA)"
    local attempt
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        printf '===== %s: starting postgres\n' "$(date '+%F %T')" >>"$lf"
        if as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$lf" -w -t "$PG_TIMEOUT" start >/dev/null 2>&1 </dev/null 9>&-; then
            return 0
        fi
        # After a crash (kill -9) the old server's children hold the lock for a moment.
        if [[ $attempt -lt 10 ]] && tac "$lf" | sed '/^===== /q' | grep -q 'another postmaster'; then
            sleep 1
            continue
        fi
        break
    done
    fail_with_log postgres "pg_ctl start failed"
    return 1
}

pg_ready() { "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT" -d postgres -U postgres -t 2; }

pg_wait() {
    # postmaster.pid appears a moment after pg_ctl returns: wait for the server to answer.
    local deadline=$(($(now) + PG_TIMEOUT))
    while ! pg_ready; do
        if [[ $(now) -ge $deadline ]]; then
            fail_with_log postgres "not ready after ${PG_TIMEOUT}s"
            return 1
        fi
        if [[ -s $PGDATA/postmaster.pid ]] && ! pg_pid_alive; then
            fail_with_log postgres "the server process exited during startup"
            return 1
        fi
        sleep 0.3
    done
    local out
    if ! out=$("$PG_BIN/psql" -X -q -h "$HOST" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 2>&1 <<EOF
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  END IF;
END
\$\$;
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB')\gexec
EOF
    ); then
        log "postgres: creating role/database failed: $out"
        return 1
    fi
    # The real check: log in as the application would.
    if ! out=$(PGPASSWORD=$PG_PASSWORD "$PG_BIN/psql" -X -qAt -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" \
        -c 'SELECT 1' 2>&1) || [[ $out != 1 ]]; then
        fail_with_log postgres "cannot query as $PG_USER: $out"
        return 1
    fi
}

pg_probe() { # quiet: true when up and answering
    pg_find_bin || return 1
    pg_paths
    pg_pid_alive && pg_ready
}

pg_stop() {
    pg_find_bin || { log "postgres: not installed"; return 0; }
    pg_paths
    if ! pg_pid_alive; then
        log "postgres: not running"
        return 0
    fi
    log "postgres: stopping"
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" stop -m fast -w -t 60 >/dev/null 2>&1; then
        log "postgres: pg_ctl stop -m fast failed, trying immediate"
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" stop -m immediate -w -t 30 >/dev/null 2>&1
    fi
    pg_pid_alive && { log "postgres: still running"; return 1; }
    log "postgres: stopped"
}

# ------------------------------------------------------------------ redis

REDIS_PIDFILE=$SD/run/redis.pid

redis_install() {
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
    apt_install redis-server
}

redis_launch() {
    redis_install || return 1
    if pid_alive "$REDIS_PIDFILE" redis-server; then
        log "redis: already running"
        return 0
    fi
    if port_open "$REDIS_PORT"; then
        log "redis: port $REDIS_PORT is taken by another process (set REDIS_PORT)"
        return 1
    fi
    mkdir -p "$SD/redis"
    local lf
    lf=$(logfile_of redis)
    printf '===== %s: starting redis\n' "$(date '+%F %T')" >>"$lf"
    log "redis: starting on $HOST:$REDIS_PORT"
    # shellcheck disable=SC2094 # redis-server appends to its log itself once daemonized
    if ! redis-server --bind "$HOST" --port "$REDIS_PORT" --daemonize yes \
        --pidfile "$REDIS_PIDFILE" --logfile "$lf" --dir "$SD/redis" \
        --save '' --appendonly no >>"$lf" 2>&1 </dev/null 9>&-; then
        fail_with_log redis "redis-server failed to start"
        return 1
    fi
}

redis_ready() { [[ $(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }

redis_wait() { wait_until redis "$REDIS_TIMEOUT" "" "" redis_ready; }

redis_probe() { command -v redis-cli >/dev/null && pid_alive "$REDIS_PIDFILE" redis-server && redis_ready; }

redis_stop() {
    if ! pid_alive "$REDIS_PIDFILE" redis-server; then
        rm -f "$REDIS_PIDFILE"
        log "redis: not running"
        return 0
    fi
    local pid
    pid=$(head -n 1 "$REDIS_PIDFILE")
    log "redis: stopping (pid $pid)"
    redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1
    if ! wait_pid_exit "$pid" 15; then
        stop_pid redis "$REDIS_PIDFILE" redis-server 15
        return
    fi
    rm -f "$REDIS_PIDFILE"
    log "redis: stopped"
}

# ------------------------------------------------------------------ mongo (FerretDB)

FERRET_SRC=$SCRIPTS/ferretdb
FERRET_BIN=$SD/bin/ferretdb
FERRET_PIDFILE=$SD/run/mongo.pid

ferret_build() {
    local go
    go=$(command -v go || ls /usr/local/go/bin/go 2>/dev/null)
    if [[ -z $go ]]; then
        log "mongo: Go is not installed (FerretDB v1.24.2 needs Go >= 1.24 to build)"
        return 1
    fi
    local stamp
    stamp=$(cat "$FERRET_SRC/main.go" "$FERRET_SRC/go.mod" "$FERRET_SRC/go.sum" | sha256sum | cut -d' ' -f1)
    if [[ -x $FERRET_BIN && -f $FERRET_BIN.stamp && $(cat "$FERRET_BIN.stamp") == "$stamp" ]]; then
        return 0
    fi
    log "mongo: building FerretDB into $FERRET_BIN (first time takes a few minutes; log: $(logfile_of mongo-build))"
    mkdir -p "$SD/bin" "$SD/go"
    local t0
    t0=$(now)
    if ! (cd "$FERRET_SRC" &&
        GOMODCACHE=$SD/go/mod GOCACHE=$SD/go/cache GOFLAGS="-modcacherw -buildvcs=false -mod=readonly" \
            CGO_ENABLED=0 nice -n 10 "$go" build -trimpath -o "$FERRET_BIN.tmp" .) >"$(logfile_of mongo-build)" 2>&1; then
        fail_with_log mongo-build "go build failed"
        return 1
    fi
    mv -f "$FERRET_BIN.tmp" "$FERRET_BIN"
    echo "$stamp" >"$FERRET_BIN.stamp"
    log "mongo: built in $(($(now) - t0))s"
}

mongo_launch() {
    if pid_alive "$FERRET_PIDFILE" "$FERRET_BIN"; then
        log "mongo: already running"
        return 0
    fi
    ferret_build || return 1
    if port_open "$MONGO_PORT"; then
        log "mongo: port $MONGO_PORT is taken by another process (set MONGO_PORT)"
        return 1
    fi
    mkdir -p "$SD/mongo/data"
    log "mongo: starting FerretDB (SQLite backend) on $HOST:$MONGO_PORT"
    launch_bg mongo "$FERRET_PIDFILE" "$FERRET_BIN" -listen "$HOST:$MONGO_PORT" \
        -handler sqlite -sqlite-dir "$SD/mongo/data" -log-level warn ||
        { fail_with_log mongo "could not launch $FERRET_BIN"; return 1; }
}

mongo_ready() { "$PYTHON" "$SCRIPTS/service_probe.py" mongo "$HOST" "$MONGO_PORT"; }

mongo_wait() { wait_until mongo "$MONGO_TIMEOUT" "$FERRET_PIDFILE" "$FERRET_BIN" mongo_ready; }

mongo_probe() { pid_alive "$FERRET_PIDFILE" "$FERRET_BIN" && mongo_ready; }

mongo_stop() { stop_pid mongo "$FERRET_PIDFILE" "$FERRET_BIN" 30; }

# ------------------------------------------------------------------ cql (Cassandra)

CASS_HOME=$SD/cassandra
CASS_LIB=$CASS_HOME/lib
CASS_PIDFILE=$SD/run/cql.pid
CASS_MAIN=org.apache.cassandra.service.CassandraDaemon

java_major() {
    java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = \([0-9.]*\).*/\1/p' |
        sed 's/^1\.//; s/\..*//'
}

cass_install() {
    if ! command -v java >/dev/null; then
        apt_install openjdk-17-jre-headless || return 1
    fi
    local jv
    jv=$(java_major)
    if [[ $jv != 11 && $jv != 17 ]]; then
        log "cql: Cassandra 5.0 runs on Java 11 or 17; \`java\` is Java ${jv:-?}"
        return 1
    fi
    local stamp
    stamp=$(sha256sum <"$SCRIPTS/cassandra/pom.xml" | cut -d' ' -f1)
    if [[ -f $CASS_LIB/.stamp && $(cat "$CASS_LIB/.stamp") == "$stamp" ]]; then
        return 0
    fi
    if ! command -v mvn >/dev/null; then
        apt_install maven || return 1
    fi
    log "cql: downloading Cassandra's jars into $CASS_LIB (log: $(logfile_of cql-download))"
    local t0
    t0=$(now)
    rm -rf "$CASS_LIB.tmp"
    if ! nice -n 10 mvn -B -q -f "$SCRIPTS/cassandra/pom.xml" -Dmaven.repo.local="$SD/m2" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$CASS_LIB.tmp" \
        >"$(logfile_of cql-download)" 2>&1; then
        fail_with_log cql-download "mvn dependency:copy-dependencies failed"
        return 1
    fi
    rm -rf "$CASS_LIB"
    mv "$CASS_LIB.tmp" "$CASS_LIB"
    echo "$stamp" >"$CASS_LIB/.stamp"
    log "cql: jars downloaded in $(($(now) - t0))s"
}

cql_launch() {
    if pid_alive "$CASS_PIDFILE" "$CASS_MAIN"; then
        log "cql: already running"
        return 0
    fi
    cass_install || return 1
    if port_open "$CQL_PORT"; then
        log "cql: port $CQL_PORT is taken by another process (set CQL_PORT)"
        return 1
    fi
    if port_open "$CQL_STORAGE_PORT"; then
        log "cql: port $CQL_STORAGE_PORT (Cassandra internode) is taken (set CQL_STORAGE_PORT)"
        return 1
    fi
    mkdir -p "$CASS_HOME/conf" "$CASS_HOME/data"
    sed -e "s/@CQL_PORT@/$CQL_PORT/g; s/@STORAGE_PORT@/$CQL_STORAGE_PORT/g" \
        "$SCRIPTS/cassandra/cassandra.yaml" >"$CASS_HOME/conf/cassandra.yaml"
    local jamm
    local jars=("$CASS_LIB"/jamm-*.jar)
    jamm=${jars[0]}
    [[ -f $jamm ]] || { log "cql: no jamm jar in $CASS_LIB"; return 1; }
    local opts=(
        -Xms512m "-Xmx$CQL_HEAP" -Xss512k
        -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1
        -XX:+ExitOnOutOfMemoryError -XX:-OmitStackTraceInFastThrow
        # JPMS, as in Cassandra 5.0's conf/jvm17-server.options
        -Djdk.attach.allowAttachSelf=true
        --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
        --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
        --add-exports java.sql/java.sql=ALL-UNNAMED
        --add-exports java.base/java.lang.ref=ALL-UNNAMED
        --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
        --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
        --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
        --add-opens java.base/java.lang.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
        --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
        --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
        --add-opens java.base/jdk.internal.math=ALL-UNNAMED
        --add-opens java.base/jdk.internal.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
        --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
        --add-opens java.base/sun.nio.ch=ALL-UNNAMED
        --add-opens java.base/java.io=ALL-UNNAMED
        --add-opens java.base/java.lang.reflect=ALL-UNNAMED
        --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
        --add-opens java.base/java.lang=ALL-UNNAMED
        --add-opens java.base/java.util=ALL-UNNAMED
        -Dio.netty.tryReflectionSetAccessible=true
        -Dio.netty.allocator.useCacheForAllThreads=true
        -Dio.netty.allocator.maxOrder=11
        "-javaagent:$jamm"
        "-Dcassandra.config=file://$CASS_HOME/conf/cassandra.yaml"
        "-Dcassandra.storagedir=$CASS_HOME/data"
        "-Dcassandra.logdir=$SD/log"
        "-Dlogback.configurationFile=file://$SCRIPTS/cassandra/logback.xml"
        -Dcassandra-foreground=yes
        # fast single-node startup
        -Dcassandra.skip_wait_for_gossip_to_settle=0
        -Dcassandra.ring_delay_ms=1000
        -Dcassandra.superuser_setup_delay_ms=0
        -cp "$CASS_LIB/*"
        "$CASS_MAIN"
    )
    log "cql: starting Cassandra on $HOST:$CQL_PORT (heap $CQL_HEAP)"
    launch_bg cql "$CASS_PIDFILE" java "${opts[@]}" ||
        { fail_with_log cql "could not launch java"; return 1; }
}

cql_ready() { "$PYTHON" "$SCRIPTS/service_probe.py" cql "$HOST" "$CQL_PORT"; }

cql_wait() { wait_until cql "$CQL_TIMEOUT" "$CASS_PIDFILE" "$CASS_MAIN" cql_ready; }

cql_probe() { pid_alive "$CASS_PIDFILE" "$CASS_MAIN" && cql_ready; }

cql_stop() { stop_pid cql "$CASS_PIDFILE" "$CASS_MAIN" 90; }

# ------------------------------------------------------------------ commands

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
CMD=$1
shift
SERVICES=()
for s in "$@"; do
    case $s in
        postgres | pg | postgresql) SERVICES+=(postgres) ;;
        redis) SERVICES+=(redis) ;;
        mongo | mongodb | ferretdb) SERVICES+=(mongo) ;;
        cql | cassandra | scylla) SERVICES+=(cql) ;;
        all) SERVICES+=("${ALL_SERVICES[@]}") ;;
        *)
            log "unknown service '$s' (want: ${ALL_SERVICES[*]})"
            exit 2
            ;;
    esac
done
[[ ${#SERVICES[@]} -gt 0 ]] || SERVICES=("${ALL_SERVICES[@]}")
# de-duplicate, keep order
declare -A _seen=()
_list=()
for s in "${SERVICES[@]}"; do [[ -n ${_seen[$s]:-} ]] || { _seen[$s]=1; _list+=("$s"); }; done
SERVICES=("${_list[@]}")

mkdir -p "$SD/log" "$SD/run"
PYTHON=$(find_python) || PYTHON=python3

pfx() { if [[ $1 == postgres ]]; then echo pg; else echo "$1"; fi; }

wanted() { local s; for s in "${SERVICES[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }

# One start/stop at a time (parallel test runners may all call `start`).
lock() {
    exec 9>"$SD/run/services.lock"
    if ! flock -w 600 9; then
        log "could not get $SD/run/services.lock"
        exit 1
    fi
}

case $CMD in
    start)
        lock
        t_all=$(now)
        declare -A launched=()
        rc=0
        # Launch the slow ones first so they boot while the others are prepared.
        for s in cql postgres redis mongo; do
            wanted "$s" || continue
            if "$(pfx "$s")_launch"; then launched[$s]=1; else rc=1; fi
        done
        for s in "${SERVICES[@]}"; do
            [[ -n ${launched[$s]:-} ]] || continue
            t0=$(now)
            if "$(pfx "$s")_wait"; then
                url_of "$s"
                log "$s: ready (waited $(($(now) - t0))s)"
            else
                rc=1
            fi
        done
        log "start: done in $(($(now) - t_all))s"
        exit $rc
        ;;
    stop)
        lock
        rc=0
        for s in "${SERVICES[@]}"; do "$(pfx "$s")_stop" || rc=1; done
        exit $rc
        ;;
    status)
        rc=0
        for s in "${SERVICES[@]}"; do
            if "$(pfx "$s")_probe" >/dev/null 2>&1; then
                echo "$s: up $(url_of "$s")"
            else
                echo "$s: down"
                rc=3
            fi
        done
        exit $rc
        ;;
    env)
        for s in "${SERVICES[@]}"; do
            if "$(pfx "$s")_probe" >/dev/null 2>&1; then
                echo "export $(url_of "$s")"
            else
                log "$s: not running (no export)"
            fi
        done
        exit 0
        ;;
    url | urls)
        for s in "${SERVICES[@]}"; do url_of "$s"; done
        ;;
    *) usage ;;
esac
