#!/usr/bin/env bash
# Builds tally and runs the embedded demo: a generated month of AI usage through
# ingest -> aggregator -> rater, with no servers. Extra arguments go to `tally demo`
# (see `tally demo --help`). Output lands in ./tally-demo/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/ensure-toolchain.sh"
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p tally
exec "$root/target/release/tally" demo "$@"
