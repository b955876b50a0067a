#!/usr/bin/env bash
# Prometheus for integration tests: Debian's prometheus package, run as a plain
# background process on 127.0.0.1:9090 with our configuration and storage under
# .services/prometheus/. It scrapes the Tally services every second; their addresses come
# from a file_sd file, .services/prometheus/targets.json, that tests may rewrite while it
# runs (Prometheus notices the change by itself within about 5 seconds: its service
# discovery passes on changes at most every 5 s).
#
#   scripts/services/prometheus.sh install   # apt-get install prometheus curl (if missing)
#   scripts/services/prometheus.sh start     # install if needed, write config, start, wait for /-/ready
#   scripts/services/prometheus.sh stop      # SIGTERM, kill -9 after 30 s
#   scripts/services/prometheus.sh status    # exit 0 running and ready, 3 stopped, 1 not ready
#   scripts/services/prometheus.sh restart
#   scripts/services/prometheus.sh reset     # stop and delete the stored samples
#   scripts/services/prometheus.sh targets [SPEC]   # rewrite targets.json (default SPEC below)
#
# SPEC (also read from PROMETHEUS_TARGETS by start) is a comma-separated list of
# job=host:port, default:
#   ingest=127.0.0.1:9101,aggregator=127.0.0.1:9102,rater=127.0.0.1:9103
# Each target gets the label job=<job>; metrics are read from /metrics. `start` writes
# targets.json from PROMETHEUS_TARGETS when that is set, or the default when the file does
# not exist yet; otherwise it keeps the file as it is. To change targets by hand, write a
# new file and rename it over targets.json (a rename is atomic; Prometheus never sees a
# half-written file).
#
# Settings (environment): PROMETHEUS_PORT (9090), PROMETHEUS_TARGETS, TALLY_SERVICES_DIR
# (.services), TALLY_START_TIMEOUT (90), TALLY_STOP_TIMEOUT (30).
set -euo pipefail
SERVICE=prometheus
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

PROM_PORT="${PROMETHEUS_PORT:-9090}"
DEFAULT_TARGETS="ingest=127.0.0.1:9101,aggregator=127.0.0.1:9102,rater=127.0.0.1:9103"
DIR="$SERVICES_DIR/prometheus"
CONFIG="$DIR/prometheus.yml"
TARGETS="$DIR/targets.json"
LOGFILE="$DIR/server.log"
PIDFILE="$DIR/prometheus.pid"
BIN=/usr/bin/prometheus
MARKER="$CONFIG"
URL="http://127.0.0.1:$PROM_PORT"

cmd_install() {
  apt_install prometheus curl
  [ -x "$BIN" ] || die "$BIN missing after installing prometheus"
  log "installed: prometheus $(dpkg-query -W -f='${Version}' prometheus)"
}

# write_targets SPEC: targets.json from "job=host:port,job=host:port", written atomically.
write_targets() {
  local spec=$1 entry job addr body=""
  local -a entries
  IFS=',' read -r -a entries <<<"$spec"
  for entry in "${entries[@]}"; do
    entry="${entry// /}"
    [ -n "$entry" ] || continue
    job="${entry%%=*}"
    addr="${entry#*=}"
    if [ "$job" = "$entry" ] || ! [[ "$job" =~ ^[A-Za-z_][A-Za-z0-9_-]*$ ]] ||
      ! [[ "$addr" =~ ^[A-Za-z0-9._-]+:[0-9]+$ ]]; then
      die "bad target '$entry': expected job=host:port"
    fi
    [ -z "$body" ] || body+=$',\n'
    body+="  {\"targets\": [\"$addr\"], \"labels\": {\"job\": \"$job\"}}"
  done
  mkdir -p "$DIR"
  printf '[\n%s\n]\n' "$body" >"$TARGETS.tmp"
  mv "$TARGETS.tmp" "$TARGETS"
  log "scrape targets ($TARGETS): ${spec}"
}

write_config() {
  mkdir -p "$DIR/data"
  cat >"$CONFIG.new" <<EOF
# Written by scripts/services/prometheus.sh: scrapes the Tally services every second
# and evaluates the alerting rules users get (deploy/prometheus/alerts.yml).
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s

rule_files:
  - '$REPO_ROOT/deploy/prometheus/alerts.yml'

scrape_configs:
  # One scrape config for every Tally service; each target's job label (ingest,
  # aggregator, rater) comes from targets.json.
  - job_name: tally
    metrics_path: /metrics
    file_sd_configs:
      - files: ['$TARGETS']
        refresh_interval: 5s
EOF
  mv "$CONFIG.new" "$CONFIG"
}

answers() {
  curl -sf --max-time 5 "$URL/-/ready" >/dev/null 2>&1
}

print_where() {
  log "Prometheus running: pid $1, $URL (ready: $URL/-/ready), config $CONFIG, targets $TARGETS, data $DIR/data, log $LOGFILE"
}

cmd_start() {
  cmd_install
  if [ -n "${PROMETHEUS_TARGETS:-}" ]; then
    write_targets "$PROMETHEUS_TARGETS"
  elif [ ! -f "$TARGETS" ]; then
    write_targets "$DEFAULT_TARGETS"
  fi
  local pid
  if pid="$(pid_of "$PIDFILE" "$MARKER")"; then
    log "already running (pid $pid)"
    wait_ready Prometheus "$PIDFILE" "$MARKER" "$LOGFILE" answers
    print_where "$pid"
    return 0
  fi
  require_free_ports "$PROM_PORT"
  write_config
  if command -v promtool >/dev/null; then
    promtool check config "$CONFIG" >>"$LOGFILE" 2>&1 || {
      tail -n 10 "$LOGFILE" >&2
      die "promtool rejects $CONFIG"
    }
  fi
  log "starting Prometheus on $URL, log $LOGFILE"
  (cd "$DIR" && launch "$PIDFILE" "$LOGFILE" "$BIN" \
    --config.file="$CONFIG" \
    --web.listen-address="127.0.0.1:$PROM_PORT" \
    --storage.tsdb.path="$DIR/data" \
    --storage.tsdb.retention.time=2d \
    --web.enable-lifecycle \
    --log.level=info)
  wait_ready Prometheus "$PIDFILE" "$MARKER" "$LOGFILE" answers
  print_where "$(pid_of "$PIDFILE" "$MARKER")"
}

cmd_stop() {
  stop_pid Prometheus "$PIDFILE" "$MARKER"
}

cmd_status() {
  report_status "$URL/-/ready does not answer"
}

cmd_reset() {
  cmd_stop
  log "deleting $DIR/data"
  rm -rf "$DIR/data"
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
restart)
  cmd_stop
  cmd_start
  ;;
reset) cmd_reset ;;
targets)
  write_targets "${2:-$DEFAULT_TARGETS}"
  # A running server reads the alerting rules again too, so it evaluates the
  # repository's current deploy/prometheus/alerts.yml (targets it reads by itself).
  if answers; then
    curl -sf -X POST --max-time 10 "$URL/-/reload" >/dev/null || log "could not reload the rules at $URL/-/reload (see $LOGFILE)"
  fi
  ;;
*)
  echo "usage: $0 {install|start|stop|status|restart|reset|targets [job=host:port,...]}" >&2
  exit 2
  ;;
esac
