//! Tally's benchmarks. Nothing here is used by the product; see benches/README.md.
//!
//! - `benches/run.sh rate`: `tally rate` versus DuckDB over a generated month
//!   (benches/rate_vs_duckdb.py and benches/rate_vs_duckdb.sql).
//! - `benches/run.sh dedupe`: heap bytes per key held by the aggregator's dedupe set
//!   (src/bin/dedupe_memory.rs).
//! - `benches/run.sh stream`: events from a Kafka producer to invoice lines in
//!   ClickHouse through `tally serve aggregator` and `tally serve rater`, against a
//!   plain consumer's rate, and the produce-to-invoice-line delay
//!   (src/bin/stream_bench.rs); `benches/run.sh stream-profile` shows where the
//!   aggregator's consume loop spends its time (benches/aggregator_wall.py).
