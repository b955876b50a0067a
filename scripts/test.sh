#!/usr/bin/env bash
# The whole test suite, as CI runs it: unit, property and fuzz-style tests of the
# core crates, and black-box tests of the `tally` command. Then the lints.
# Installs what it needs through the project's own scripts; needs no servers yet.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/ensure-toolchain.sh

mkdir -p target
echo "== tests"
cargo test --workspace --all-targets --locked 2>&1 | tee target/test.log
echo "== lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings
# cargo prints one result line per test binary; add them up for one closing line.
awk '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' target/test.log
