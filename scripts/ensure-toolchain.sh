#!/usr/bin/env bash
# Checks for what building Tally needs: a Rust toolchain with cargo, rustfmt and
# clippy, and a C compiler (SQLite is compiled from source, bundled by rusqlite).
# Installs what it can from Debian's packages; says what to do otherwise.
set -euo pipefail
missing=()
command -v cargo >/dev/null || missing+=("cargo (install Rust with rustup: https://rustup.rs)")
command -v cc >/dev/null || {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq build-essential >/dev/null
  else
    missing+=("a C compiler (Debian: apt-get install build-essential)")
  fi
}
if [ ${#missing[@]} -gt 0 ]; then
  printf 'tally needs: %s\n' "${missing[@]}" >&2
  exit 1
fi
