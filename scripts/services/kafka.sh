#!/usr/bin/env bash
# Apache Kafka for integration tests: one KRaft node (broker and controller in one JVM)
# on 127.0.0.1:9092 (controller 127.0.0.1:9093), jars from Maven Central, no download
# of a Kafka distribution.
#
#   scripts/services/kafka.sh install   # Java 17 and Maven if missing, then the broker jars
#   scripts/services/kafka.sh start     # install if needed, format storage once, start, wait
#   scripts/services/kafka.sh stop      # SIGTERM (clean shutdown), kill -9 after 30 s
#   scripts/services/kafka.sh status    # exit 0 running and answering, 3 stopped, 1 not answering
#   scripts/services/kafka.sh restart
#   scripts/services/kafka.sh reset     # stop and delete all topics and data
#   scripts/services/kafka.sh topics ARGS...   # kafka-topics (TopicCommand) against the broker
#   scripts/services/kafka.sh tool CLASS ARGS...  # any tool class on the broker's classpath
#
# Every command can be run again: install skips what is there, start does nothing when
# the broker already runs. Settings (environment): KAFKA_VERSION (default 4.4.0),
# KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093), KAFKA_HEAP_OPTS (-Xms256m -Xmx512m),
# KAFKA_JAVA (the java to use; default Debian's OpenJDK 17, else a Java 17+ from JAVA_HOME
# or PATH, else openjdk-17-jre-headless is installed),
# TALLY_SERVICES_DIR (.services), TALLY_START_TIMEOUT (90), TALLY_STOP_TIMEOUT (30).
#
# Topics are not created automatically (auto.create.topics.enable=false): tests and
# services create the topics they use, as production will.
set -euo pipefail
SERVICE=kafka
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
# A fixed cluster id (base64 of "TallyKafkaTest01"), so the storage is formatted the same
# way on every machine.
KAFKA_CLUSTER_ID="VGFsbHlLYWZrYVRlc3QwMQ"

DIR="$SERVICES_DIR/kafka"
LIBS="$DIR/libs"
CONF="$DIR/config"
DATA="$DIR/data"
LOGFILE="$DIR/server.log"
PIDFILE="$DIR/kafka.pid"
POM="$SERVICES_LIB_DIR/kafka/pom.xml"
# What identifies our broker's command line (see pid_of).
MARKER="$CONF/server.properties"

# --- Java 17+ and Maven -----------------------------------------------------------------

java_major() { # JAVA -> the major version, e.g. 17
  "$1" -XshowSettings:properties -version 2>&1 |
    awk -F= '/java.specification.version/ { gsub(/ /, "", $2); print $2 }'
}

# The Java to run Kafka on: KAFKA_JAVA if set, else Debian's OpenJDK 17 (the machine's
# default Java), else JAVA_HOME's or the first java on PATH, if it is 17 or newer.
find_java() {
  local candidates=() j v
  [ -n "${KAFKA_JAVA:-}" ] && candidates+=("$KAFKA_JAVA")
  candidates+=(/usr/lib/jvm/java-17-openjdk-*/bin/java)
  [ -n "${JAVA_HOME:-}" ] && candidates+=("$JAVA_HOME/bin/java")
  command -v java >/dev/null && candidates+=("$(command -v java)")
  for j in "${candidates[@]}"; do
    [ -x "$j" ] || continue
    v="$(java_major "$j")"
    if [[ "$v" =~ ^[0-9]+$ ]] && [ "$v" -ge 17 ]; then
      echo "$j"
      return 0
    fi
  done
  return 1
}

ensure_java() {
  if ! JAVA="$(find_java)"; then
    apt_install openjdk-17-jre-headless
    JAVA="$(find_java)" || die "no Java 17 or newer found after installing openjdk-17-jre-headless"
  fi
}

ensure_maven() {
  command -v mvn >/dev/null || apt_install maven
}

# --- install: the jars -------------------------------------------------------------------

libs_complete() { [ -f "$LIBS/.complete-$KAFKA_VERSION" ]; }
jar_count() {
  local jars=("$LIBS"/*.jar)
  echo "${#jars[@]}"
}

cmd_install() {
  ensure_java
  if libs_complete; then
    log "Kafka $KAFKA_VERSION jars already in $LIBS ($(jar_count) jars); Java: $JAVA"
    return 0
  fi
  ensure_maven
  log "fetching the Kafka $KAFKA_VERSION broker jars from Maven Central into $LIBS"
  local tmp="$DIR/libs.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  local start=$SECONDS
  # Into a temporary folder, then renamed: an interrupted download never leaves a half
  # classpath that looks complete.
  if ! mvn -q -B -f "$POM" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
    >"$DIR/mvn.log" 2>&1; then
    tail -n 30 "$DIR/mvn.log" >&2
    rm -rf "$tmp"
    die "mvn could not fetch the Kafka jars (full log: $DIR/mvn.log)"
  fi
  [ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ] || die "kafka_2.13-$KAFKA_VERSION.jar missing after mvn"
  touch "$tmp/.complete-$KAFKA_VERSION"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  log "installed Kafka $KAFKA_VERSION: $(jar_count) jars, $(du -sh "$LIBS" | cut -f1), in $((SECONDS - start)) s"
}

# --- configuration -----------------------------------------------------------------------

write_config() {
  mkdir -p "$CONF" "$DATA"
  # Written on every start, so a change here takes effect at the next start.
  cat >"$CONF/server.properties.new" <<EOF
# Written by scripts/services/kafka.sh: single-node KRaft Kafka for tests, loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA

# One node: every internal topic with one replica, so transactions and consumer groups
# work. Fewer partitions than the defaults (50) make their first use quicker.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=5
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=5
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
num.partitions=1

# Tests create their topics explicitly.
auto.create.topics.enable=false
delete.topic.enable=true
# Consumer groups start at once instead of waiting 3 s for more members.
group.initial.rebalance.delay.ms=0

log.retention.hours=168
num.network.threads=2
num.io.threads=4
EOF
  mv "$CONF/server.properties.new" "$CONF/server.properties"
  cat >"$CONF/log4j2.properties" <<'EOF'
# Written by scripts/services/kafka.sh: everything to stdout, which goes to server.log.
status = warn
name = tally-kafka
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
EOF
}

java_cmd() { # CLASS ARGS... : runs a class on the broker's classpath (a short-lived tool)
  "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="file:$CONF/log4j2-tools.properties" \
    -cp "$LIBS/*" "$@"
}

write_tools_log_config() {
  mkdir -p "$CONF"
  cat >"$CONF/log4j2-tools.properties" <<'EOF'
# Written by scripts/services/kafka.sh: command-line tools log warnings to stderr only.
status = warn
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
EOF
}

format_storage() {
  if [ -f "$DATA/meta.properties" ]; then
    return 0
  fi
  log "formatting the KRaft storage in $DATA (cluster id $KAFKA_CLUSTER_ID)"
  java_cmd kafka.tools.StorageTool format --config "$CONF/server.properties" \
    --cluster-id "$KAFKA_CLUSTER_ID" --ignore-formatted >>"$LOGFILE" 2>&1 ||
    {
      tail -n 20 "$LOGFILE" >&2
      die "formatting the storage failed (see $LOGFILE)"
    }
}

# --- readiness ---------------------------------------------------------------------------

answers() { # the broker accepts connections and serves metadata (lists topics)
  port_open "$KAFKA_PORT" &&
    timeout 30 "$JAVA" -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
      -Dlog4j2.configurationFile="file:$CONF/log4j2-tools.properties" \
      -cp "$LIBS/*" org.apache.kafka.tools.TopicCommand \
      --bootstrap-server "127.0.0.1:$KAFKA_PORT" --list >/dev/null 2>&1
}

# --- commands ----------------------------------------------------------------------------

cmd_start() {
  cmd_install
  write_tools_log_config
  local pid
  if pid="$(pid_of "$PIDFILE" "$MARKER")"; then
    log "already running (pid $pid)"
    wait_ready Kafka "$PIDFILE" "$MARKER" "$LOGFILE" answers
    print_where "$pid"
    return 0
  fi
  require_free_ports "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"
  write_config
  format_storage
  log "starting Kafka $KAFKA_VERSION (KRaft, node 1) on 127.0.0.1:$KAFKA_PORT, log $LOGFILE"
  # shellcheck disable=SC2086 # KAFKA_HEAP_OPTS holds several options
  launch "$PIDFILE" "$LOGFILE" "$JAVA" $KAFKA_HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true \
    -Dlog4j2.configurationFile="file:$CONF/log4j2.properties" \
    -cp "$LIBS/*" kafka.Kafka "$CONF/server.properties"
  wait_ready Kafka "$PIDFILE" "$MARKER" "$LOGFILE" answers
  print_where "$(pid_of "$PIDFILE" "$MARKER")"
}

print_where() {
  log "Kafka $KAFKA_VERSION running: pid $1, bootstrap 127.0.0.1:$KAFKA_PORT, controller 127.0.0.1:$KAFKA_CONTROLLER_PORT, data $DATA, log $LOGFILE"
}

cmd_stop() {
  stop_pid Kafka "$PIDFILE" "$MARKER"
}

cmd_status() {
  JAVA="$(find_java)" || die "no Java 17 found"
  write_tools_log_config
  report_status "does not answer on 127.0.0.1:$KAFKA_PORT"
}

cmd_reset() {
  cmd_stop
  log "deleting $DATA"
  rm -rf "$DATA"
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
topics | tool)
  what=$1
  shift
  JAVA="$(find_java)" || die "no Java 17 found: run $0 install"
  libs_complete || die "Kafka jars not installed: run $0 install"
  write_tools_log_config
  if [ "$what" = topics ]; then
    java_cmd org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" "$@"
  else
    java_cmd "$@"
  fi
  ;;
*)
  echo "usage: $0 {install|start|stop|status|restart|reset|topics ARGS...|tool CLASS ARGS...}" >&2
  exit 2
  ;;
esac
