//! The ingest stage: usage events in; validated and decoded events out of a file or
//! stdin, and validated events' bytes out to Kafka from HTTP.
//!
//! Every event passes the same validation whether it comes from a file, stdin or HTTP.
//! A bad line never stops a run: it becomes a reject that names the line, the field and
//! the reason, and is kept.
//!
//! Layout:
//! - [`lines`]: JSON-lines input decoded on several threads, delivered in file order.
//! - [`http`]: the HTTP ingest service (`tally serve ingest`): `POST /v1/events`
//!   validates CloudEvents and produces them to Kafka, with API keys, per-key rate
//!   limits (its keys replaceable while it runs), `/healthz`, `/readyz` and
//!   `/metrics`; entry point [`http::start`].

pub mod http;
pub mod lines;

pub use http::IngestError;
pub use lines::{decode_lines, Line, LineReject};
