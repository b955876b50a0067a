#!/usr/bin/env bash
# The benchmarks in benches/README.md, from the repo root:
#   benches/run.sh [rate|dedupe|stream|stream-profile|all]
#
# Idempotent: builds tally (release), generates bench-data/events.jsonl and
# bench-data/tally.toml unless already generated with the same arguments, and installs
# DuckDB with pip into bench-data/venv unless present. bench-data/ is git-ignored.
# `stream` also starts Kafka and ClickHouse on loopback (scripts/services/up.sh) unless
# they run. `all` is rate, dedupe and stream.
set -euo pipefail

cd "$(dirname "$0")/.."
what="${1:-all}"
data=bench-data
duckdb_version="${DUCKDB_VERSION:-2.0.1}"
gen_args=(--events 2000000 --customers 2000 --period 2026-10 --seed 42 --malformed 0)

mkdir -p "$data"

data() {
    cargo build --release -p tally
    local stamp="$data/events.args"
    if [[ ! -f "$data/events.jsonl" || ! -f "$data/tally.toml" || "$(cat "$stamp" 2>/dev/null)" != "${gen_args[*]}" ]]; then
        rm -f "$stamp"
        target/release/tally generate "${gen_args[@]}" --out "$data/events.jsonl" --config-out "$data/tally.toml"
        echo "${gen_args[*]}" > "$stamp"
    fi
}

rate() {
    data
    if ! "$data/venv/bin/python" -c "import duckdb, sys; sys.exit(duckdb.__version__ != '$duckdb_version')" 2>/dev/null; then
        python3 -m venv "$data/venv"
        "$data/venv/bin/pip" install --quiet "duckdb==$duckdb_version"
    fi
    "$data/venv/bin/python" benches/rate_vs_duckdb.py --data "$data" --runs "${RUNS:-3}" --results "$data/rate_vs_duckdb.json"
}

dedupe() {
    cargo run --release -p tally-benches --bin dedupe_memory
}

# Kafka to ClickHouse through the services (benches/README.md, section 3). Settings:
# RUNS (3), PARTITIONS (2), AGGREGATORS (1), LATENCY_SECONDS (40), LIMIT (all events),
# WARMUP (1: a short unreported run first), RATER_MIN_INSERT_INTERVAL and
# AGGREGATOR_COMMIT_INTERVAL (the defaults), RATER_STORE_WINDOWS (1: the rater stores
# windows too).
stream_args() {
    stream_flags=(--runs "${RUNS:-3}" --partitions "${PARTITIONS:-2}"
        --aggregators "${AGGREGATORS:-1}" --latency-seconds "${LATENCY_SECONDS:-40}")
    if [[ -n "${LIMIT:-}" ]]; then stream_flags+=(--limit "$LIMIT"); fi
    if [[ -n "${RATER_MIN_INSERT_INTERVAL:-}" ]]; then
        stream_flags+=(--rater-min-insert-interval "$RATER_MIN_INSERT_INTERVAL")
    fi
    if [[ -n "${AGGREGATOR_COMMIT_INTERVAL:-}" ]]; then
        stream_flags+=(--aggregator-commit-interval "$AGGREGATOR_COMMIT_INTERVAL")
    fi
    if [[ "${RATER_STORE_WINDOWS:-0}" == 1 ]]; then stream_flags+=(--rater-store-windows); fi
}

stream_prepare() {
    data
    cargo build --release -p tally-benches --bin stream_bench
    scripts/services/up.sh kafka clickhouse
}

stream() {
    stream_prepare
    stream_args
    # A broker just started (its JIT, the page cache) made the first run up to 40 %
    # slower than the next ones: one run without the latency phase, not reported,
    # warms it up first.
    if [[ "${WARMUP:-1}" != 0 ]]; then
        echo "warming Kafka up with an unreported run (WARMUP=0 skips it); log in $data/stream-warmup.log"
        target/release/stream_bench --runs 1 --latency-seconds 0 \
            --partitions "${PARTITIONS:-2}" --out "$data/stream-warmup" \
            --results "$data/stream-warmup.json" > "$data/stream-warmup.log" 2>&1
    fi
    target/release/stream_bench "${stream_flags[@]}" --out "$data/stream" --results "$data/stream.json"
}

# One throughput run with the aggregator under perf: where its consume loop's wall time
# goes (on CPU, waiting for a commit, for messages or for the batch being processed),
# then the hottest functions of the whole process (batches are processed on threads
# that live for one batch, so the process is sampled, not a thread).
stream_profile() {
    stream_prepare
    command -v perf > /dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 1; }
    local out="$data/stream-profile"
    rm -rf "$out"
    target/release/stream_bench --runs 1 --latency-seconds 0 --partitions "${PARTITIONS:-2}" \
        --out "$out" --results "$data/stream-profile.json" > "$data/stream-profile.log" 2>&1 &
    local bench=$!
    local pid=""
    for _ in $(seq 1 300); do
        pid=$(pgrep -f "serve aggregator --config $out/run-1/tally.toml" | head -1 || true)
        [[ -n "$pid" ]] && break
        sleep 1
    done
    [[ -n "$pid" ]] || { echo "the aggregator did not start; see $data/stream-profile.log" >&2; exit 1; }
    sleep 3
    # The busiest thread is the consume loop.
    local tid
    # (fields after the name, which may hold spaces: utime and stime are the 12th and 13th)
    # Batch threads come and go: skip any that ended while being listed.
    tid=$(for t in /proc/"$pid"/task/*; do
        stat=$(sed 's/.*) //' "$t/stat" 2> /dev/null) || continue
        echo "$(awk '{print $12 + $13}' <<< "$stat") ${t##*/}"
    done | sort -n | tail -1 | cut -d' ' -f2)
    perf record -q -a -m 16M -e sched:sched_switch -e sched:sched_wakeup -o "$out/switches.data" -- sleep 4 > /dev/null 2>&1 &
    local switches=$!
    perf record -q -t "$tid" -m 16M -e sched:sched_switch --call-graph dwarf,8192 -o "$out/sleeps.data" -- sleep 4 > /dev/null 2>&1
    wait "$switches" || true
    perf record -q -p "$pid" -F 499 -o "$out/cpu.data" -- sleep 4 > /dev/null 2>&1
    wait "$bench"
    grep -v '^    ' "$data/stream-profile.log"
    echo
    echo "== the aggregator's consume loop (thread $tid): where its wall time went =="
    python3 benches/aggregator_wall.py "$tid" "$out/switches.data" "$out/sleeps.data"
    echo
    echo "== the aggregator process's CPU, by function (self, top 40) =="
    perf report -i "$out/cpu.data" --no-children --sort symbol --stdio 2> /dev/null \
        | grep -E '^ +[0-9]' | cut -c1-160 | sed -n 1,40p
}

case "$what" in
    rate) rate ;;
    dedupe) dedupe ;;
    stream) stream ;;
    stream-profile) stream_profile ;;
    all) rate; dedupe; stream ;;
    *) echo "usage: benches/run.sh [rate|dedupe|stream|stream-profile|all]" >&2; exit 2 ;;
esac
