//! Tally's benchmarks. Nothing here is used by the product; see benches/README.md.
//!
//! - `benches/run.sh rate`: `tally rate` versus DuckDB over a generated month
//!   (benches/rate_vs_duckdb.py and benches/rate_vs_duckdb.sql).
//! - `benches/run.sh dedupe`: heap bytes per key held by the aggregator's dedupe set
//!   (src/bin/dedupe_memory.rs).
