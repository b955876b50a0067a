//! The JSON bodies the API answers with: per-event results for requests whose events
//! were looked at, and one error shape for requests refused as a whole. Both are
//! described, with examples, in `ingest/openapi.json`.

use std::borrow::Cow;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tally_schemas::event::EventError;

use super::unbilled::Unbilled;

/// The answer to a request whose events were validated and whose accepted events Kafka
/// acknowledged.
#[derive(Debug, Serialize)]
pub struct EventsResponse<'a> {
    /// Events stored (acknowledged by Kafka).
    pub accepted: usize,
    /// Events refused by validation; each result says the field and why.
    pub rejected: usize,
    /// Events repeating the `(source, id)` of an earlier event of the same request,
    /// not stored again.
    pub duplicates: usize,
    /// One per event, in request order.
    pub results: Vec<EventResult<'a>>,
}

/// What became of one event of the request.
#[derive(Debug, Serialize)]
pub struct EventResult<'a> {
    /// Position in the batch, from 0 (0 for a single event).
    pub index: usize,
    /// The event's `id`, when it has one that is a string.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
    #[serde(flatten)]
    pub status: EventStatus,
}

#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EventStatus {
    Accepted {
        /// Set when the event is stored but bills nothing as the price book stands:
        /// `unmetered_type`, `too_late`, `unknown_customer`, `not_subscribed` or `not_priced`.
        #[serde(skip_serializing_if = "Option::is_none")]
        warning: Option<&'static str>,
        /// Why, for people, with the warning.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Rejected {
        /// `time`, `data.tokens`, ... or `event` when the event as a whole is wrong.
        field: String,
        /// A stable code for programs (`missing_field`, `invalid_time`, ...).
        code: &'static str,
        /// What is wrong, for people.
        reason: String,
    },
    DuplicateInBatch {
        /// Index of the earlier event with the same `(source, id)`.
        duplicate_of: usize,
    },
}

impl EventStatus {
    /// Accepted; with a warning when it would bill nothing as the price book stands.
    pub fn accepted(unbilled: Option<&Unbilled>) -> Self {
        EventStatus::Accepted {
            warning: unbilled.map(Unbilled::code),
            reason: unbilled.map(Unbilled::reason),
        }
    }

    /// Rejected, with `hint` after the reason when the request's shape explains it.
    pub fn rejected(error: &EventError, hint: Option<&str>) -> Self {
        let reason = error.problem.to_string();
        EventStatus::Rejected {
            field: error.field.clone(),
            code: error.problem.code(),
            reason: match hint {
                Some(hint) => format!("{reason}; {hint}"),
                None => reason,
            },
        }
    }
}

/// A request refused as a whole: a code for programs and a message for people.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: &'static str,
    pub message: String,
    /// The batch index the error is about, when it is about one event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

impl ErrorBody {
    pub fn new(error: &'static str, message: impl Into<String>) -> Self {
        ErrorBody {
            error,
            message: message.into(),
            index: None,
        }
    }

    pub fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    /// The response with this body and `status`.
    pub fn into_response(self, status: StatusCode) -> Response {
        json(status, &self)
    }
}

/// A JSON response.
pub fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        // Our bodies are plain structs of strings and numbers: this cannot happen.
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the response: {e}\n"),
        )
            .into_response(),
    }
}

/// Adds `Retry-After: seconds`.
pub fn with_retry_after(mut response: Response, seconds: u64) -> Response {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_schemas::event::Problem;

    #[test]
    fn results_are_flat_objects_tagged_by_status() {
        let error = EventError {
            field: "time".to_owned(),
            problem: Problem::Missing,
        };
        let body = EventsResponse {
            accepted: 2,
            rejected: 1,
            duplicates: 1,
            results: vec![
                EventResult {
                    index: 0,
                    id: Some("a".into()),
                    status: EventStatus::Accepted {
                        warning: None,
                        reason: None,
                    },
                },
                EventResult {
                    index: 1,
                    id: None,
                    status: EventStatus::rejected(&error, None),
                },
                EventResult {
                    index: 2,
                    id: Some("a".into()),
                    status: EventStatus::DuplicateInBatch { duplicate_of: 0 },
                },
                EventResult {
                    index: 3,
                    id: Some("b".into()),
                    status: EventStatus::Accepted {
                        warning: Some("unmetered_type"),
                        reason: Some("no meter reads it".into()),
                    },
                },
            ],
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"accepted":2,"rejected":1,"duplicates":1,"results":[{"index":0,"id":"a","status":"accepted"},{"index":1,"status":"rejected","field":"time","code":"missing_field","reason":"required field is missing or null"},{"index":2,"id":"a","status":"duplicate_in_batch","duplicate_of":0},{"index":3,"id":"b","status":"accepted","warning":"unmetered_type","reason":"no meter reads it"}]}"#
        );
    }

    #[test]
    fn error_bodies_name_the_index_only_when_there_is_one() {
        let plain = ErrorBody::new("unauthorized", "no key");
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"error":"unauthorized","message":"no key"}"#
        );
        let at = ErrorBody::new("forbidden_source", "no").at(3);
        assert_eq!(
            serde_json::to_string(&at).unwrap(),
            r#"{"error":"forbidden_source","message":"no","index":3}"#
        );
    }
}
