#!/usr/bin/env bash
# A current ClickHouse engine for checking that Tally's SQL, written to run on Debian's
# ClickHouse 18.16, runs on a current release too (as docker-compose.yml deploys it).
# No current server can be installed here (Debian ships 18.16, there is no Docker), so
# this installs chDB (PyPI `chdb-core`: the ClickHouse engine as a library) and serves
# it through scripts/services/chdb_http.py, the part of ClickHouse's HTTP interface Tally
# uses, on 127.0.0.1:8124. Tally's code and SQL run unchanged against it.
#
#   scripts/services/clickhouse-current.sh install   # pip install chdb-core into .services/
#   scripts/services/clickhouse-current.sh start     # install if needed, start, wait for /ping
#   scripts/services/clickhouse-current.sh stop      # SIGTERM, kill -9 after 30 s
#   scripts/services/clickhouse-current.sh status    # exit 0 running and answering, 3 stopped
#   scripts/services/clickhouse-current.sh restart
#   scripts/services/clickhouse-current.sh reset     # stop and delete the data
#
# Settings (environment): CLICKHOUSE_CURRENT_PORT (8124), TALLY_SERVICES_DIR (.services),
# TALLY_START_TIMEOUT (90), TALLY_STOP_TIMEOUT (30).
set -euo pipefail
SERVICE=clickhouse-current
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

# ClickHouse 26.9, the engine release of this wheel.
CHDB_VERSION=26.9.0
PORT="${CLICKHOUSE_CURRENT_PORT:-8124}"
DIR="$SERVICES_DIR/clickhouse-current"
LIB="$DIR/lib-$CHDB_VERSION"
LOGFILE="$DIR/server.log"
PIDFILE="$DIR/chdb_http.pid"
MARKER="chdb_http.py"
URL="http://127.0.0.1:$PORT"

cmd_install() {
  if [ -d "$LIB/chdb" ]; then
    return 0
  fi
  command -v python3 >/dev/null || die "python3 not found"
  log "installing chdb-core $CHDB_VERSION from PyPI into $LIB"
  rm -rf "$LIB.tmp"
  # Without its dependencies (pandas, pyarrow): the SQL engine needs none of them.
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$LIB.tmp" "chdb-core==$CHDB_VERSION" >"$DIR/pip.log" 2>&1 || {
    tail -n 20 "$DIR/pip.log" >&2
    die "could not install chdb-core $CHDB_VERSION (log: $DIR/pip.log)"
  }
  mv "$LIB.tmp" "$LIB"
}

answers() {
  curl -sf --max-time 5 "$URL/ping" >/dev/null 2>&1
}

cmd_start() {
  mkdir -p "$DIR"
  cmd_install
  local pid
  if pid="$(pid_of "$PIDFILE" "$MARKER")"; then
    log "already running (pid $pid)"
  else
    require_free_ports "$PORT"
    log "starting chDB $CHDB_VERSION behind ClickHouse's HTTP interface on $URL, log $LOGFILE"
    launch "$PIDFILE" "$LOGFILE" env PYTHONPATH="$LIB" python3 "$SERVICES_LIB_DIR/chdb_http.py" \
      --listen "127.0.0.1:$PORT" --data "$DIR/data"
  fi
  wait_ready "ClickHouse (chDB)" "$PIDFILE" "$MARKER" "$LOGFILE" answers
  log "running: $(grep -o 'ClickHouse [0-9.]* (chDB)' "$LOGFILE" | tail -n 1) on $URL, log $LOGFILE"
}

cmd_stop() {
  stop_pid "ClickHouse (chDB)" "$PIDFILE" "$MARKER"
}

cmd_status() {
  local pid
  if ! pid="$(pid_of "$PIDFILE" "$MARKER")"; then
    log "stopped"
    exit 3
  fi
  answers || die "process $pid runs but $URL/ping does not answer (see $LOGFILE)"
  log "running: pid $pid, $URL"
}

case "${1:-}" in
install)
  mkdir -p "$DIR"
  cmd_install
  ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
restart)
  cmd_stop
  cmd_start
  ;;
reset)
  cmd_stop
  log "deleting $DIR/data"
  rm -rf "$DIR/data"
  ;;
*) usage_exit ;;
esac
