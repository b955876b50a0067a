//! The ingest service's metrics, and one function per thing worth counting.
//!
//! Labels are bounded: `route` is a route template (`/v1/events`), `status` an HTTP
//! status code, `outcome` one of three words and `reason` a decoder error code or an
//! accepted event's warning code. No
//! label ever holds a customer, a key, a tenant or an event id.

use std::time::Duration;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};
use tally_runtime::metrics::Metrics;
use tally_schemas::event::EventError;

use super::server::{EVENTS_ROUTE, UNMATCHED_ROUTE};
use super::unbilled::Unbilled;

/// What happened to one event of a request that got an answer from Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    DuplicateInBatch,
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::DuplicateInBatch => "duplicate_in_batch",
            Outcome::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone)]
pub struct IngestMetrics {
    requests: IntCounterVec,
    request_duration: HistogramVec,
    events: IntCounterVec,
    rejected: IntCounterVec,
    unbilled: IntCounterVec,
    produce_duration: Histogram,
    /// Counted where the copies' deliveries end, in the producer's background task.
    pub rejected_copies_lost: IntCounter,
}

impl IngestMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let events = metrics.counter_vec(
            "tally_ingest_events_total",
            "Events of answered ingest requests, by outcome (accepted, duplicate_in_batch, rejected).",
            &["outcome"],
        );
        // Every outcome is shown from the start, at zero, so rates need no absent().
        for outcome in [
            Outcome::Accepted,
            Outcome::DuplicateInBatch,
            Outcome::Rejected,
        ] {
            events.with_label_values(&[outcome.as_str()]);
        }
        let unbilled = metrics.counter_vec(
            "tally_ingest_unbilled_events_total",
            "Events accepted with a warning that they bill nothing as the price book stands, by reason (the warning's code: unmetered_type, too_late, unknown_customer, not_subscribed, not_priced).",
            &["reason"],
        );
        for code in Unbilled::CODES {
            unbilled.with_label_values(&[code]);
        }
        let requests = metrics.counter_vec(
            "tally_http_requests_total",
            "HTTP requests answered, by route template and status code.",
            &["route", "status"],
        );
        // A sender's first refused requests count in increase() only if their series
        // was there before them (an alert watches these). A wrong method is counted
        // under the route its path matched.
        for (route, statuses) in [
            (
                EVENTS_ROUTE,
                &[
                    "202", "400", "401", "403", "405", "413", "415", "422", "429", "503",
                ][..],
            ),
            (UNMATCHED_ROUTE, &["404"][..]),
        ] {
            for status in statuses {
                requests.with_label_values(&[route, status]);
            }
        }
        IngestMetrics {
            unbilled,
            requests,
            request_duration: metrics.latency_vec(
                "tally_http_request_duration_seconds",
                "Time to answer an HTTP request, by route template.",
                &["route"],
            ),
            events,
            rejected: metrics.counter_vec(
                "tally_ingest_rejected_events_total",
                "Events refused by validation, by reason (the decoder's error code).",
                &["reason"],
            ),
            produce_duration: metrics.latency(
                "tally_ingest_kafka_produce_duration_seconds",
                "Time from producing a request's events to Kafka acknowledging all of them.",
            ),
            rejected_copies_lost: metrics.counter(
                "tally_ingest_rejected_copies_lost_total",
                "Copies of refused events not kept in the rejected topic (Kafka did not take them, or was unusable); their senders had the reasons in the answers.",
            ),
        }
    }

    /// One request answered.
    pub fn request(&self, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
        self.request_duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// The events of one answered request: counted once per request, not per event.
    pub fn events(&self, outcome: Outcome, count: usize) {
        if count > 0 {
            self.events
                .with_label_values(&[outcome.as_str()])
                .inc_by(count as u64);
        }
    }

    /// One event refused by validation.
    pub fn rejected(&self, error: &EventError) {
        self.rejected
            .with_label_values(&[error.problem.code()])
            .inc();
    }

    /// One event accepted with a warning that it bills nothing.
    pub fn unbilled(&self, unbilled: &Unbilled) {
        self.unbilled.with_label_values(&[unbilled.code()]).inc();
    }

    /// Kafka acknowledged every event of a request after `elapsed`.
    pub fn produced(&self, elapsed: Duration) {
        self.produce_duration.observe(elapsed.as_secs_f64());
    }
}
