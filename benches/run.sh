#!/usr/bin/env bash
# The benchmarks in benches/README.md, from the repo root: `benches/run.sh [rate|dedupe|all]`.
#
# Idempotent: builds tally (release), generates bench-data/events.jsonl and
# bench-data/tally.toml unless already generated with the same arguments, and installs
# DuckDB with pip into bench-data/venv unless present. bench-data/ is git-ignored.
set -euo pipefail

cd "$(dirname "$0")/.."
what="${1:-all}"
data=bench-data
duckdb_version="${DUCKDB_VERSION:-2.0.1}"
gen_args=(--events 2000000 --customers 2000 --period 2026-10 --seed 42 --malformed 0)

mkdir -p "$data"

rate() {
    cargo build --release -p tally
    local stamp="$data/events.args"
    if [[ ! -f "$data/events.jsonl" || ! -f "$data/tally.toml" || "$(cat "$stamp" 2>/dev/null)" != "${gen_args[*]}" ]]; then
        rm -f "$stamp"
        target/release/tally generate "${gen_args[@]}" --out "$data/events.jsonl" --config-out "$data/tally.toml"
        echo "${gen_args[*]}" > "$stamp"
    fi
    if ! "$data/venv/bin/python" -c "import duckdb, sys; sys.exit(duckdb.__version__ != '$duckdb_version')" 2>/dev/null; then
        python3 -m venv "$data/venv"
        "$data/venv/bin/pip" install --quiet "duckdb==$duckdb_version"
    fi
    "$data/venv/bin/python" benches/rate_vs_duckdb.py --data "$data" --runs "${RUNS:-3}" --results "$data/rate_vs_duckdb.json"
}

dedupe() {
    cargo run --release -p tally-benches --bin dedupe_memory
}

case "$what" in
    rate) rate ;;
    dedupe) dedupe ;;
    all) rate; dedupe ;;
    *) echo "usage: benches/run.sh [rate|dedupe|all]" >&2; exit 2 ;;
esac
