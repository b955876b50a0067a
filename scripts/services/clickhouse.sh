#!/usr/bin/env bash
# ClickHouse for integration tests: Debian's clickhouse-server package (18.16 on Debian
# 12), run as a plain background process with our own configuration and data under
# .services/clickhouse/, HTTP on 127.0.0.1:8123, HTTPS on 127.0.0.1:8443 and native TCP
# on 127.0.0.1:9000 only. No systemd or init script: the package's own service is never
# started. HTTPS serves a certificate for localhost and 127.0.0.1 signed by a test CA
# made on first start, .services/clickhouse/tls/ca.pem (what clickhouse.ca_file names
# in the TLS tests).
#
#   scripts/services/clickhouse.sh install   # apt-get install clickhouse-server curl (if missing)
#   scripts/services/clickhouse.sh start     # install if needed, start, wait for SELECT 1
#   scripts/services/clickhouse.sh stop      # SIGTERM, kill -9 after 30 s
#   scripts/services/clickhouse.sh status    # exit 0 running and answering, 3 stopped, 1 not answering
#   scripts/services/clickhouse.sh restart
#   scripts/services/clickhouse.sh reset     # stop and delete all databases
#   scripts/services/clickhouse.sh query 'SQL'   # runs SQL over HTTP, prints the result
#   scripts/services/clickhouse.sh selftest  # the SQL the rater will need, on a scratch database
#
# User `default`, no password, and `tally_test`, password `tally-test-password` (for the
# tests that send credentials), from 127.0.0.1 only. Settings (environment):
# CLICKHOUSE_HTTP_PORT (8123), CLICKHOUSE_HTTPS_PORT (8443), CLICKHOUSE_TCP_PORT (9000),
# TALLY_SERVICES_DIR (.services),
# TALLY_START_TIMEOUT (90), TALLY_STOP_TIMEOUT (30).
#
# Runs as the user that calls it (root in CI): ClickHouse 18.16 has no objection to root
# as long as the data directory belongs to the same user, which it does here.
set -euo pipefail
SERVICE=clickhouse
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

CH_HTTP_PORT="${CLICKHOUSE_HTTP_PORT:-8123}"
CH_TCP_PORT="${CLICKHOUSE_TCP_PORT:-9000}"
CH_HTTPS_PORT="${CLICKHOUSE_HTTPS_PORT:-8443}"
DIR="$SERVICES_DIR/clickhouse"
TLS="$DIR/tls"
CONFIG="$DIR/config.xml"
LOGFILE="$DIR/server.log"
PIDFILE="$DIR/clickhouse.pid"
BIN=/usr/sbin/clickhouse-server
MARKER="$CONFIG"
URL="http://127.0.0.1:$CH_HTTP_PORT/"

cmd_install() {
  apt_install clickhouse-server curl openssl
  [ -x "$BIN" ] || die "$BIN missing after installing clickhouse-server"
  log "installed: clickhouse-server $(dpkg-query -W -f='${Version}' clickhouse-server)"
}

# loopback_user NAME PASSWORD PROFILE: a users.xml entry for a user who may connect
# from this machine only, with that profile and the default quota.
loopback_user() {
  cat <<EOF
        <$1>
            <password>$2</password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>$3</profile>
            <quota>default</quota>
        </$1>
EOF
}

# A test CA and, signed by it, a certificate for localhost and 127.0.0.1; made once.
make_certificates() {
  [ -s "$TLS/server.pem" ] && [ -s "$TLS/ca.pem" ] && return 0
  mkdir -p "$TLS"
  local out="$TLS/openssl.log"
  printf 'subjectAltName = DNS:localhost, IP:127.0.0.1\n' >"$TLS/server.ext"
  if ! {
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=Tally test CA" \
      -keyout "$TLS/ca.key" -out "$TLS/ca.pem" &&
      openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$TLS/server.key" -out "$TLS/server.csr" &&
      openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" \
        -CAcreateserial -days 3650 -extfile "$TLS/server.ext" -out "$TLS/server.pem"
  } >"$out" 2>&1; then
    rm -f "$TLS/ca.pem" "$TLS/server.pem"
    die "openssl could not make the test CA and ClickHouse's certificate in $TLS: see $out"
  fi
  log "made a test CA ($TLS/ca.pem) and ClickHouse's certificate for localhost, 127.0.0.1"
}

write_config() {
  mkdir -p "$DIR/data" "$DIR/tmp" "$DIR/user_files" "$DIR/format_schemas"
  make_certificates
  # Written on every start, so a change here takes effect at the next start.
  cat >"$CONFIG.new" <<EOF
<?xml version="1.0"?>
<!-- Written by scripts/services/clickhouse.sh: one server for tests, loopback only. -->
<yandex>
    <logger>
        <level>information</level>
        <console>1</console>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$CH_HTTP_PORT</http_port>
    <tcp_port>$CH_TCP_PORT</tcp_port>
    <https_port>$CH_HTTPS_PORT</https_port>
    <openSSL>
        <server>
            <certificateFile>$TLS/server.pem</certificateFile>
            <privateKeyFile>$TLS/server.key</privateKeyFile>
            <verificationMode>none</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <cacheSessions>true</cacheSessions>
            <disableProtocols>sslv2,sslv3</disableProtocols>
            <preferServerCiphers>true</preferServerCiphers>
        </server>
    </openSSL>
    <!-- No interserver (replication) port, no native TLS port, no MySQL port. -->
    <max_connections>1024</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>$DIR/data/</path>
    <tmp_path>$DIR/tmp/</tmp_path>
    <user_files_path>$DIR/user_files/</user_files_path>
    <format_schema_path>$DIR/format_schemas/</format_schema_path>
    <users_config>$DIR/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
    <max_session_timeout>3600</max_session_timeout>
    <default_session_timeout>60</default_session_timeout>
    <query_log>
        <database>system</database>
        <table>query_log</table>
        <partition_by>toYYYYMM(event_date)</partition_by>
        <flush_interval_milliseconds>7500</flush_interval_milliseconds>
    </query_log>
    <!-- Small merges, quickly: tests insert little data and read it with FINAL. -->
    <merge_tree>
        <parts_to_delay_insert>300</parts_to_delay_insert>
        <parts_to_throw_insert>600</parts_to_throw_insert>
    </merge_tree>
</yandex>
EOF
  mv "$CONFIG.new" "$CONFIG"
  {
    cat <<'EOF'
<?xml version="1.0"?>
<!-- Written by scripts/services/clickhouse.sh, loopback only: user default with no
     password, and for the tests of credentials tally_test with one and tally_reader,
     read-only (readonly = 1: it may change no setting either), with none. -->
<yandex>
    <profiles>
        <default>
            <max_memory_usage>2000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
            <load_balancing>random</load_balancing>
        </default>
        <readonly>
            <readonly>1</readonly>
        </readonly>
    </profiles>
    <users>
EOF
    loopback_user default "" default
    loopback_user tally_test tally-test-password default
    loopback_user tally_reader "" readonly
    cat <<'EOF'
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
EOF
  } >"$DIR/users.xml.new"
  mv "$DIR/users.xml.new" "$DIR/users.xml"
}

# query SQL [curl options...]: POSTs SQL to the HTTP interface and prints the answer; on
# an error prints ClickHouse's message to stderr and fails.
query() {
  local sql=$1 out
  shift
  if ! out="$(curl -sS --fail-with-body --max-time 30 "$@" --data-binary "$sql" "$URL" 2>&1)"; then
    printf '%s\n' "$out" >&2
    return 1
  fi
  [ -z "$out" ] || printf '%s\n' "$out"
}

answers() {
  [ "$(curl -s --max-time 5 "${URL}?query=SELECT%201" 2>/dev/null)" = 1 ]
}

print_where() {
  log "ClickHouse $(curl -s --max-time 5 "${URL}?query=SELECT%20version()" || echo '?') running: pid $1, HTTP $URL, HTTPS https://127.0.0.1:$CH_HTTPS_PORT/ (CA $TLS/ca.pem), native 127.0.0.1:$CH_TCP_PORT, data $DIR/data, log $LOGFILE"
}

cmd_start() {
  cmd_install
  local pid
  if pid="$(pid_of "$PIDFILE" "$MARKER")"; then
    if grep -q "<https_port>$CH_HTTPS_PORT</https_port>" "$CONFIG" &&
      grep -q "<tally_reader>" "$DIR/users.xml"; then
      log "already running (pid $pid)"
      wait_ready ClickHouse "$PIDFILE" "$MARKER" "$LOGFILE" answers
      print_where "$pid"
      return 0
    fi
    # Started by an earlier version of this script (without HTTPS on this port, or
    # without the read-only test user).
    log "running (pid $pid) with an earlier configuration: restarting it with this one"
    cmd_stop
  fi
  require_free_ports "$CH_HTTP_PORT" "$CH_HTTPS_PORT" "$CH_TCP_PORT"
  write_config
  log "starting ClickHouse on 127.0.0.1:$CH_HTTP_PORT (HTTP), 127.0.0.1:$CH_HTTPS_PORT (HTTPS) and 127.0.0.1:$CH_TCP_PORT (native), log $LOGFILE"
  # Run from $DIR: the server may write files (status, preprocessed configs) next to it.
  (cd "$DIR" && launch "$PIDFILE" "$LOGFILE" "$BIN" --config-file="$CONFIG")
  wait_ready ClickHouse "$PIDFILE" "$MARKER" "$LOGFILE" answers
  print_where "$(pid_of "$PIDFILE" "$MARKER")"
}

cmd_stop() {
  stop_pid ClickHouse "$PIDFILE" "$MARKER"
}

cmd_status() {
  report_status "does not answer on $URL"
}

cmd_reset() {
  cmd_stop
  log "deleting $DIR/data"
  rm -rf "$DIR/data" "$DIR/tmp"
}

# The statements the ClickHouse rater will rely on, checked on a scratch database.
cmd_selftest() {
  answers || die "ClickHouse is not answering on $URL: run $0 start"
  local db=tally_selftest out want
  query "DROP DATABASE IF EXISTS $db" >/dev/null
  query "CREATE DATABASE $db" >/dev/null
  # New-style MergeTree syntax (ORDER BY, PARTITION BY) with a version column.
  query "CREATE TABLE $db.lines (
      id String,
      customer String,
      amount Decimal(38, 10),
      period_start DateTime,
      version UInt64
    ) ENGINE = ReplacingMergeTree(version)
    PARTITION BY toYYYYMM(period_start)
    ORDER BY (customer, id)" >/dev/null
  # Decimals must be bare JSON numbers in JSONEachRow on 18.16 (a quoted "10.5" is a
  # parse error), with at most the column's scale of fractional digits. Two inserts, so
  # two parts: FINAL has to merge them at read time.
  query "INSERT INTO $db.lines FORMAT JSONEachRow
{\"id\":\"l1\",\"customer\":\"c1\",\"amount\":10.5,\"period_start\":\"2026-11-01 00:00:00\",\"version\":1}
{\"id\":\"l2\",\"customer\":\"c2\",\"amount\":0.0000000001,\"period_start\":\"2026-11-01 00:00:00\",\"version\":1}" >/dev/null
  query "INSERT INTO $db.lines FORMAT JSONEachRow
{\"id\":\"l1\",\"customer\":\"c1\",\"amount\":1234567890123456789012345678.1234567891,\"period_start\":\"2026-11-01 00:00:00\",\"version\":2}" >/dev/null
  out="$(query "SELECT id, amount, version FROM $db.lines FINAL ORDER BY id FORMAT TSV")"
  want="$(printf 'l1\t1234567890123456789012345678.1234567891\t2\nl2\t0.0000000001\t1')"
  if [ "$out" != "$want" ]; then
    query "DROP DATABASE $db" >/dev/null || true
    die "selftest: SELECT ... FINAL gave:
$out
expected:
$want"
  fi
  out="$(query "SELECT argMax(amount, version) FROM $db.lines WHERE id = 'l1' FORMAT TSV")"
  query "DROP DATABASE $db" >/dev/null
  [ "$out" = "1234567890123456789012345678.1234567891" ] || die "selftest: argMax gave $out"
  log "selftest passed: CREATE DATABASE, ReplacingMergeTree(version) ... ORDER BY, Decimal(38, 10), INSERT FORMAT JSONEachRow, SELECT ... FINAL, argMax"
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
query)
  [ $# -ge 2 ] || die "usage: $0 query 'SQL'"
  query "$2"
  ;;
selftest) cmd_selftest ;;
*)
  echo "usage: $0 {install|start|stop|status|restart|reset|query SQL|selftest}" >&2
  exit 2
  ;;
esac
