//! The HTTP ingest service: usage events in over HTTP, validated, into the events topic.
//!
//! Data flow: `POST /v1/events` (one CloudEvent, a batch, or one event in binary
//! mode) -> API key and its rate limit -> body size and shape -> every event's
//! `source` checked against the key -> each event validated exactly as `tally rate`
//! validates it -> valid, new events produced to `<prefix>.events` as their senders'
//! bytes (a binary-mode event structured), keyed by `subject` -> once
//! Kafka acknowledged all of them, a 202 with one result per event. `/healthz`,
//! `/readyz` (Kafka answers, the events topic exists and the windows topic gives the
//! pipeline's partition count) and `/metrics` are served beside it.
//! The API is described in `ingest/openapi.json`.
//!
//! - `server`: routes, the handler, [`start`] and the [`KeyReloader`] of a running service.
//! - `connections`: the accept loop, with its header-read timeout and connection cap.
//! - `request`: content types, cutting a batch into its events' raw text, and the
//!   structured event a binary-mode request stands for.
//! - `check`: the verdict on each event, and the source check, before Kafka.
//! - `unbilled`: why an accepted event would bill nothing, for its warning.
//! - `auth`: API keys, compared in constant time.
//! - `rate_limit`: a token bucket per key.
//! - `producer`: the idempotent Kafka producer and the readiness probe.
//! - `response`: the JSON bodies.
//! - `metrics`: the service's Prometheus metrics.
//! - `error`: [`IngestError`], why the service could not start or stopped.

mod auth;
mod check;
mod connections;
mod error;
mod metrics;
mod producer;
mod rate_limit;
mod request;
mod response;
mod server;
mod unbilled;

pub use error::IngestError;
pub use server::{start, KeyReloader, Running, EVENTS_ROUTE, ROUTES};
