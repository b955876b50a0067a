#!/usr/bin/env bash
# Stops the servers started by scripts/services/up.sh (all, or those named):
#   scripts/services/down.sh
#   scripts/services/down.sh kafka
# Data stays under .services/ for the next start; `scripts/services/<name>.sh reset`
# deletes it. Safe to run when nothing runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

services=("$@")
[ ${#services[@]} -gt 0 ] || services=(prometheus clickhouse-current clickhouse kafka)
rc=0
for s in "${services[@]}"; do
  case "$s" in
  kafka | clickhouse | prometheus | clickhouse-current) "$here/$s.sh" stop || rc=1 ;;
  *)
    echo "[down] unknown service '$s' (kafka, clickhouse, prometheus, clickhouse-current)" >&2
    rc=2
    ;;
  esac
done
exit $rc
