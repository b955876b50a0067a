#!/usr/bin/env bash
# Installs (when needed) and starts the servers the streaming integration tests use, all
# on 127.0.0.1, then prints what runs where:
#   Kafka 4.x (KRaft)   127.0.0.1:9092 (controller 127.0.0.1:9093)
#   ClickHouse 18.16    127.0.0.1:8123 (HTTP), 127.0.0.1:9000 (native)
#   Prometheus 2.42     127.0.0.1:9090
#   clickhouse-current  127.0.0.1:8124 (HTTP): a current ClickHouse engine (chDB), only
#                       when named, for checking the SQL there too
#
#   scripts/services/up.sh                      # all three
#   scripts/services/up.sh kafka clickhouse     # only those
#
# Safe to run again: what is installed is not installed again, what runs is left running.
# State, logs and pid files are under .services/ (git-ignored); scripts/services/down.sh
# stops everything.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
SERVICE=up
# shellcheck source=lib.sh
. "$here/lib.sh"

services=("$@")
[ ${#services[@]} -gt 0 ] || services=(kafka clickhouse prometheus)
for s in "${services[@]}"; do
  case "$s" in
  kafka | clickhouse | prometheus | clickhouse-current) ;;
  *) die "unknown service '$s' (kafka, clickhouse, prometheus, clickhouse-current)" ;;
  esac
done

start=$SECONDS
# The Debian packages in one apt-get run (one package-list update at most), before each
# script's own install, which then finds them there.
debs=(curl)
for s in "${services[@]}"; do
  case "$s" in
  clickhouse) debs+=(clickhouse-server) ;;
  prometheus) debs+=(prometheus) ;;
  esac
done
apt_install "${debs[@]}"

for s in "${services[@]}"; do
  "$here/$s.sh" start
done

log "all started in $((SECONDS - start)) s"
echo
echo "running (state under $SERVICES_DIR):"
for s in "${services[@]}"; do
  case "$s" in
  kafka) printf '  %-11s %-40s log %s\n' kafka "bootstrap 127.0.0.1:${KAFKA_PORT:-9092}" "$SERVICES_DIR/kafka/server.log" ;;
  clickhouse) printf '  %-11s %-40s log %s\n' clickhouse "http://127.0.0.1:${CLICKHOUSE_HTTP_PORT:-8123}/ https :${CLICKHOUSE_HTTPS_PORT:-8443} native :${CLICKHOUSE_TCP_PORT:-9000}" "$SERVICES_DIR/clickhouse/server.log" ;;
  prometheus) printf '  %-11s %-40s log %s\n' prometheus "http://127.0.0.1:${PROMETHEUS_PORT:-9090}/" "$SERVICES_DIR/prometheus/server.log" ;;
  clickhouse-current) printf '  %-11s %-40s log %s\n' clickhouse-current "http://127.0.0.1:${CLICKHOUSE_CURRENT_PORT:-8124}/ (chDB)" "$SERVICES_DIR/clickhouse-current/server.log" ;;
  esac
done
