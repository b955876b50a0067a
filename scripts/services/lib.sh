# shellcheck shell=bash
# Helpers shared by scripts/services/*.sh. Sourced, not run.
#
# Every service lives under $SERVICES_DIR/<name>/ (default: .services/ at the repo root,
# git-ignored): its configuration, data, server.log and <name>.pid. Services run as plain
# background processes in their own session (no systemd, no init scripts) and listen on
# 127.0.0.1 only.

SERVICES_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SERVICES_LIB_DIR/../.." && pwd)"
SERVICES_DIR="${TALLY_SERVICES_DIR:-$REPO_ROOT/.services}"
# How long `start` waits for a service to answer, and `stop` for it to exit before kill -9.
START_TIMEOUT="${TALLY_START_TIMEOUT:-90}"
STOP_TIMEOUT="${TALLY_STOP_TIMEOUT:-30}"

SERVICE="${SERVICE:-service}"
mkdir -p "$SERVICES_DIR"

log() { printf '[%s] %s\n' "$SERVICE" "$*" >&2; }
die() {
  printf '[%s] error: %s\n' "$SERVICE" "$*" >&2
  exit 1
}

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

deb_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# apt_install PKG...: installs the Debian packages that are missing, non-interactively and
# without recommends. Package maintainer scripts are not allowed to start daemons (a
# temporary policy-rc.d answers 101 "action forbidden"), so no system-wide server with the
# package's own configuration (listening on every interface) appears: ours are started
# by these scripts, with our configuration.
apt_install() {
  local missing=() p
  for p in "$@"; do deb_installed "$p" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
  log "installing Debian packages: ${missing[*]}"
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    own_policy=1
  fi
  local rc=0
  # The package lists may be missing (fresh image) or stale: update once, then install.
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}" >"$SERVICES_DIR/apt.log" 2>&1; then
    log "apt-get install failed; running apt-get update and retrying"
    as_root apt-get update -q >>"$SERVICES_DIR/apt.log" 2>&1 || rc=$?
    if [ $rc -eq 0 ]; then
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >>"$SERVICES_DIR/apt.log" 2>&1 || rc=$?
    fi
  fi
  [ $own_policy = 1 ] && as_root rm -f "$policy"
  if [ $rc -ne 0 ]; then
    tail -n 20 "$SERVICES_DIR/apt.log" >&2
    die "could not install ${missing[*]} (full log: $SERVICES_DIR/apt.log)"
  fi
}

# pid_of PIDFILE MARKER: prints the pid in PIDFILE if that process is alive and its
# command line contains MARKER (so a stale pid file whose pid was reused is ignored).
pid_of() {
  local pidfile=$1 marker=$2 pid
  [ -f "$pidfile" ] || return 1
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker" || return 1
  echo "$pid"
}

# port_open PORT: true when something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# who_listens PORT: a line describing what listens on PORT (for error messages).
who_listens() {
  if command -v ss >/dev/null; then
    ss -ltnpH "sport = :$1" 2>/dev/null | head -n 3
  fi
}

# require_free_ports PORT...: dies if another process already listens on one of them.
require_free_ports() {
  local p
  for p in "$@"; do
    if port_open "$p"; then
      die "port $p on 127.0.0.1 is already taken by another process: $(who_listens "$p")"
    fi
  done
}

# launch PIDFILE LOGFILE CMD...: starts CMD in the background in a new session (so it
# survives the caller's terminal and Ctrl-C), stdin from /dev/null, stdout and stderr
# appended to LOGFILE, and writes its pid to PIDFILE.
launch() {
  local pidfile=$1 logfile=$2
  shift 2
  rm -f "$pidfile"
  printf '\n==== %s: starting: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$logfile"
  # The shell writes its own pid, then execs the server: the pid file names the server.
  # shellcheck disable=SC2016 # expanded by the inner shell
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$logfile" 2>&1 &
  local _
  for _ in $(seq 1 50); do
    [ -s "$pidfile" ] && return 0
    sleep 0.1
  done
  die "the server process did not start (see $logfile)"
}

# wait_ready NAME PIDFILE MARKER LOGFILE CHECK...: waits up to START_TIMEOUT seconds until
# CHECK succeeds; fails early, with the end of the log, if the process exits.
wait_ready() {
  local name=$1 pidfile=$2 marker=$3 logfile=$4
  shift 4
  local start=$SECONDS
  while :; do
    if "$@" >/dev/null 2>&1; then
      log "$name is ready after $((SECONDS - start)) s"
      return 0
    fi
    if ! pid_of "$pidfile" "$marker" >/dev/null; then
      log "$name exited while starting; last lines of $logfile:"
      tail -n 30 "$logfile" >&2
      exit 1
    fi
    if [ $((SECONDS - start)) -ge "$START_TIMEOUT" ]; then
      log "$name did not answer within $START_TIMEOUT s; last lines of $logfile:"
      tail -n 30 "$logfile" >&2
      exit 1
    fi
    sleep 0.5
  done
}

# stop_pid NAME PIDFILE MARKER: SIGTERM, wait up to STOP_TIMEOUT seconds, then SIGKILL.
stop_pid() {
  local name=$1 pidfile=$2 marker=$3 pid
  if ! pid="$(pid_of "$pidfile" "$marker")"; then
    log "$name is not running"
    rm -f "$pidfile"
    return 0
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local start=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    if [ $((SECONDS - start)) -ge "$STOP_TIMEOUT" ]; then
      log "$name did not exit within $STOP_TIMEOUT s: kill -9"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  rm -f "$pidfile"
  log "$name stopped after $((SECONDS - start)) s"
}

# listening_addresses PID: the TCP addresses the process listens on, one per line.
listening_addresses() {
  command -v ss >/dev/null || return 0
  ss -ltnpH 2>/dev/null | awk -v pid="pid=$1," 'index($0, pid) { print $4 }' | sort -u
}

# report_status WHAT_DOES_NOT_ANSWER: the `status` command of a script that defines
# PIDFILE, MARKER, LOGFILE, answers and print_where. Exits 3 when the server is stopped,
# 1 when it runs but does not answer ("process PID runs but WHAT_DOES_NOT_ANSWER").
report_status() {
  local pid
  if ! pid="$(pid_of "$PIDFILE" "$MARKER")"; then
    log "stopped"
    exit 3
  fi
  if answers; then
    print_where "$pid"
    log "listening on: $(listening_addresses "$pid" | tr '\n' ' ')"
  else
    log "process $pid runs but $1 (see $LOGFILE)"
    exit 1
  fi
}

usage_exit() {
  echo "usage: $0 {install|start|stop|status|restart|reset}" >&2
  exit 2
}
