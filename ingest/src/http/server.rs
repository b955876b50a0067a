//! The HTTP server: routes, the `POST /v1/events` handler, start and graceful stop.
//!
//! A request to `/v1/events` goes through, in order: the API key (401), the key's rate
//! limit (429), the content type and coding (415), the body size, first as announced by
//! `Content-Length` and then as streamed (413), the body's shape (400, or 413 for too
//! many events; a binary-mode request's headers and body, 400 if they make no event),
//! every event's `source` against the key (403), validation of each event, and finally
//! Kafka. The answer (202, or 422 for a single invalid event) is
//! sent only after Kafka acknowledged every accepted event; if it does not, 503 and
//! nothing is promised. A request refused on its headers (401, 429, 415) is answered
//! once its body is read and dropped, so the client's connection stays usable, and so
//! is a 413 whose body is at most [`OVER_LIMIT_READ`] bytes, so a client that sends its
//! whole body first still reads the answer. One whose body is announced larger than
//! that or held back for `100 Continue` is answered at once, one whose body takes over
//! 5 s after 5 s; both, and a 413, close the connection. On shutdown, requests in
//! flight get [`shutdown_drain`] to finish; then the service stops waiting for them
//! (their connections end with the process) and flushes the producer, so a stalled
//! client cannot hold the service up.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use prometheus::Registry;
use tally_runtime::metrics::Metrics;
use tally_runtime::ops::{BindError, Readiness};
use tally_runtime::throttle::LogThrottle;
use tally_runtime::Shutdown;
use tally_schemas::config::{ApiKey, Config, ServiceSettings};
use tally_schemas::event::{EventError, Problem, RESEND_ADVICE};
use tokio::task::JoinHandle;

use super::auth::{why_unauthorized, ApiKeys, Caller};
use super::check::{check_events, Forbidden, VerdictKind};
use super::connections::serve_connections;
use super::error::IngestError;
use super::metrics::{IngestMetrics, Outcome};
use super::producer::{EventProducer, ProduceError, Record, Refused};
use super::rate_limit::{retry_after_seconds, RateLimiter};
use super::request::{
    binary_event, body_kind, is_binary_mode, single_event_hint, split_events, BodyError, BodyKind,
    Events, ACCEPTED_TYPES, BINARY_DATA_TYPES,
};
use super::response::{
    json, with_retry_after, ErrorBody, EventResult, EventStatus, EventsResponse,
};

/// The events endpoint.
pub const EVENTS_ROUTE: &str = "/v1/events";
/// The `route` label of a request no route matched (another path, or method).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Every route the service serves (the API's and the operational ones), as the
/// OpenAPI document must list them.
pub const ROUTES: &[&str] = &[EVENTS_ROUTE, "/healthz", "/readyz", "/metrics"];

/// The header a proxy in front of ingest names the client's address in.
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// What `Retry-After` says when Kafka did not acknowledge a request: long enough for a
/// broker restart or leader election to finish, short enough not to build a backlog.
const KAFKA_RETRY_AFTER_SECONDS: u64 = 5;

/// Longest the body of a request refused on its headers is waited for (so the
/// connection stays usable) before the answer goes out and closes the connection: a
/// client without a valid key cannot hold a handler longer than this.
const DISCARD_BODY_WAIT: Duration = Duration::from_secs(5);

/// How much of a body over the limit is still read, and thrown away, before the 413
/// goes out (within [`DISCARD_BODY_WAIT`]): a client that sends its whole body before
/// it reads the answer (Python's urllib, many SDKs) then gets the 413, where a
/// connection closed under it would be a network error it retries. A body announced
/// larger, or still coming past it, is answered at once.
const OVER_LIMIT_READ: usize = 16 << 20;

/// Longest the body of an admitted request may take to arrive: a sender with a valid
/// key cannot hold the memory of a part-sent body longer (1 MiB in this time is
/// 100 KiB/s, far below any service's link).
const BODY_READ_WAIT: Duration = Duration::from_secs(10);

/// How long requests in flight may take to finish once shutdown is requested: a
/// request that waits on Kafka takes at most its acknowledgement timeout, after its
/// body took at most the time it is given.
fn shutdown_drain(producer: &EventProducer) -> Duration {
    producer.request_timeout() + BODY_READ_WAIT.max(DISCARD_BODY_WAIT)
}

/// What every request handler shares.
#[derive(Debug)]
struct App {
    /// The price book the events are validated against.
    config: Arc<Config>,
    /// Replaced whole when the keys are reloaded; a request keeps the one it read.
    key_ring: RwLock<Arc<KeyRing>>,
    /// `[ingest] rate_limit_per_second` and `rate_limit_burst`.
    rate_limit: (NonZeroU32, NonZeroU32),
    producer: EventProducer,
    metrics: IngestMetrics,
    /// `[ingest] max_body_bytes`.
    max_body_bytes: usize,
    /// `[ingest] max_batch_events`.
    max_batch_events: usize,
    /// Requests without a valid key (answered 401), by why, logged at most once a
    /// minute each with how many were left out since: a sender whose events never
    /// arrive is an operator's to find, and a flood of guesses must not fill the log.
    unauthorized: LogThrottle<&'static str>,
}

/// The API keys and their rate limits, which change together.
#[derive(Debug)]
struct KeyRing {
    keys: ApiKeys,
    /// One token bucket per key, indexed like `keys`.
    limiter: RateLimiter,
    /// Keys (by index) over their rate limit, logged once a minute each.
    rate_limited: LogThrottle<usize>,
    /// Keys (by index) sending a source they may not use (403), logged once a minute
    /// each: a sender retrying the same refused request would fill the log.
    forbidden: LogThrottle<usize>,
}

impl KeyRing {
    /// `keys`, each with a full bucket of `(per second, burst)` requests.
    fn new(keys: Vec<ApiKey>, (per_second, burst): (NonZeroU32, NonZeroU32)) -> Arc<Self> {
        Arc::new(KeyRing {
            limiter: RateLimiter::new(keys.len(), per_second, burst, Instant::now()),
            keys: ApiKeys::new(keys),
            rate_limited: LogThrottle::default(),
            forbidden: LogThrottle::default(),
        })
    }
}

impl App {
    fn key_ring(&self) -> Arc<KeyRing> {
        Arc::clone(&self.key_ring.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Replaces a running service's API keys (`tally serve` does on SIGHUP), so a key is
/// rotated or revoked without a restart. Requests already admitted finish with the key
/// they came with; every key's rate limit starts again full.
#[derive(Debug, Clone)]
pub struct KeyReloader(Arc<App>);

impl KeyReloader {
    pub fn replace(&self, keys: Vec<ApiKey>) {
        let ring = KeyRing::new(keys, self.0.rate_limit);
        *self.0.key_ring.write().unwrap_or_else(|p| p.into_inner()) = ring;
    }
}

/// The service, started: where it listens, and the task that serves until shutdown.
#[derive(Debug)]
pub struct Running {
    /// The bound address (the real port when `listen` said port 0).
    pub local_addr: SocketAddr,
    /// Ends after shutdown was requested, requests in flight were answered and the
    /// producer was flushed.
    pub handle: JoinHandle<Result<(), IngestError>>,
    /// Replaces the API keys while it runs.
    pub keys: KeyReloader,
}

impl Running {
    /// Waits until the service has stopped.
    pub async fn wait(self) -> Result<(), IngestError> {
        match self.handle.await {
            Ok(result) => result,
            Err(source) => Err(IngestError::Task {
                addr: self.local_addr,
                source,
            }),
        }
    }
}

/// Starts the ingest API on `settings.ingest.listen` and returns once it listens (with
/// `listen = "127.0.0.1:0"`, the bound address is in [`Running`]); it serves until
/// `shutdown` is requested, then stops accepting connections, lets requests in flight
/// finish and flushes the Kafka producer ([`Running::wait`]). Fails at once when the
/// address cannot be bound or the producer cannot be created.
pub async fn start(
    config: Arc<Config>,
    settings: ServiceSettings,
    shutdown: Shutdown,
) -> Result<Running, IngestError> {
    let ingest = &settings.ingest;
    let producer = EventProducer::new(&settings.kafka)?;
    let listener = tokio::net::TcpListener::bind(ingest.listen)
        .await
        .map_err(|source| BindError {
            addr: ingest.listen,
            what: "the ingest API",
            source,
        })?;
    let local_addr = listener.local_addr().unwrap_or(ingest.listen);

    let registry = Registry::new();
    let metrics = IngestMetrics::new(&Metrics::new(registry.clone()));
    let readiness = Readiness::new("no answer from Kafka yet");
    let probe = producer.watch_readiness(readiness.clone(), shutdown.clone());
    if ingest.api_keys.is_empty() {
        tracing::warn!(
            "no [[ingest.api_keys]] configured: every POST /v1/events is refused with 401"
        );
    }
    let rate_limit = (ingest.rate_limit_per_second, ingest.rate_limit_burst);
    let app = Arc::new(App {
        config,
        key_ring: RwLock::new(KeyRing::new(ingest.api_keys.clone(), rate_limit)),
        rate_limit,
        producer: producer.clone(),
        metrics: metrics.clone(),
        max_body_bytes: ingest.max_body_bytes.get(),
        max_batch_events: ingest.max_batch_events.get(),
        unauthorized: LogThrottle::default(),
    });
    let keys = KeyReloader(Arc::clone(&app));
    let router = router(app, registry, readiness, &settings.kafka.topic_prefix);
    tracing::info!(%local_addr, topic = producer.topic(), "ingest API listening");

    let drain = shutdown_drain(&producer);
    let handle = tokio::spawn(async move {
        tokio::select! {
            () = serve_connections(listener, router, {
                let shutdown = shutdown.clone();
                async move { shutdown.requested().await }
            }) => {}
            () = async {
                shutdown.requested().await;
                tokio::time::sleep(drain).await;
            } => {
                tracing::warn!(
                    seconds = drain.as_secs(),
                    "requests still open after shutdown was requested; no longer waiting for them"
                );
            }
        };
        // Every request has been answered, or given up on after the drain: what was
        // acknowledged is stored. The flush waits for events of requests that failed
        // with 503 or were given up on, which promised nothing, so they are not lost
        // silently either (a resend is deduplicated).
        producer.flush().await;
        let _ = probe.await;
        tracing::info!(%local_addr, "ingest API stopped");
        Ok(())
    });
    Ok(Running {
        local_addr,
        handle,
        keys,
    })
}

fn router(app: Arc<App>, registry: Registry, readiness: Readiness, topic_prefix: &str) -> Router {
    let metrics = app.metrics.clone();
    let max_body_bytes = app.max_body_bytes;
    let price_book = app.config.hash.to_string();
    Router::new()
        .route(EVENTS_ROUTE, post(post_events))
        .with_state(app)
        .merge(tally_runtime::ops::router(
            registry,
            readiness,
            &price_book,
            topic_prefix,
        ))
        .fallback(no_such_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(metrics, track))
        // The handler reads the body under its own cap; this one guards any extractor
        // added later.
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

/// A path no route serves, answered in JSON as the API's other errors are.
async fn no_such_route() -> Response {
    let message = format!("no such path; events go to POST {EVENTS_ROUTE}");
    ErrorBody::new("not_found", message).into_response(StatusCode::NOT_FOUND)
}

/// A method the path does not take; the `Allow` header lists those it does.
async fn wrong_method(method: Method) -> Response {
    let message = format!("{method} is not served here: the Allow header says what is");
    ErrorBody::new("method_not_allowed", message).into_response(StatusCode::METHOD_NOT_ALLOWED)
}

/// Counts and times every request, by its route's template; one that matches no route
/// (a 404) as `unmatched`, so a sender posting to a wrong path shows on the dashboard
/// without its path as a label.
async fn track(State(metrics): State<IngestMetrics>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED_ROUTE.to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.request(&route, response.status().as_u16(), started.elapsed());
    response
}

async fn post_events(
    State(app): State<Arc<App>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (caller, kind) = match admit(&app, client, &headers) {
        Ok(admitted) => admitted,
        Err(Refusal::BodyUnread(response)) => {
            return discard_body(&headers, body, app.max_body_bytes, *response).await
        }
        Err(Refusal::BodyTooLarge) => {
            let response = too_large(app.max_body_bytes);
            return discard_body(&headers, body, OVER_LIMIT_READ, response).await;
        }
    };
    let bytes = match read_body(body, app.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(ReadError::TooLarge) => return too_large(app.max_body_bytes),
        Err(ReadError::TooSlow) => {
            let mut response = ErrorBody::new(
                "body_too_slow",
                format!(
                    "the request body did not arrive within {} s; send it in one go",
                    BODY_READ_WAIT.as_secs()
                ),
            )
            .into_response(StatusCode::REQUEST_TIMEOUT);
            close_after(&mut response);
            return response;
        }
        Err(ReadError::Failed(e)) => {
            return ErrorBody::new(
                "unreadable_body",
                format!("the request body could not be read: {e}"),
            )
            .into_response(StatusCode::BAD_REQUEST)
        }
    };
    let binary;
    let body = match kind {
        BodyKind::Binary => match binary_event(&headers, &bytes) {
            Ok(event) => {
                binary = event;
                &binary[..]
            }
            Err(e) => {
                return ErrorBody::new(e.code(), e.to_string())
                    .into_response(StatusCode::BAD_REQUEST)
            }
        },
        _ => &bytes[..],
    };
    let events = match split_events(kind, body, app.max_batch_events) {
        Ok(events) => events,
        Err(e) => {
            let (status, code) = match e {
                BodyError::TooManyEvents { .. } => {
                    (StatusCode::PAYLOAD_TOO_LARGE, "too_many_events")
                }
                BodyError::Empty => (StatusCode::BAD_REQUEST, "empty_body"),
                BodyError::EmptyBatch => (StatusCode::BAD_REQUEST, "empty_batch"),
                BodyError::NotAnArray => (StatusCode::BAD_REQUEST, "not_an_array"),
                BodyError::InvalidBatch(_) => (StatusCode::BAD_REQUEST, "invalid_batch"),
            };
            return ErrorBody::new(code, e.to_string()).into_response(status);
        }
    };
    let hint = single_event_hint(kind, &headers, body);
    ingest(&app, caller, &events, hint).await
}

/// Why a request is refused on its headers alone.
enum Refusal {
    /// Answered once the body is read and thrown away.
    BodyUnread(Box<Response>),
    /// `Content-Length` announces more than the limit: answered at once, on a
    /// connection then closed.
    BodyTooLarge,
}

/// The checks a request's headers decide: key, rate limit, content type and announced
/// size. `client` is the connection's peer, for the log.
fn admit(
    app: &App,
    client: SocketAddr,
    headers: &HeaderMap,
) -> Result<(Caller, BodyKind), Refusal> {
    if let Some(name) = repeated_header(headers) {
        let message = format!("header {name} is sent more than once; send it once (a proxy in front may read another of them than ingest does)");
        return Err(Refusal::BodyUnread(Box::new(
            ErrorBody::new("invalid_header", message).into_response(StatusCode::BAD_REQUEST),
        )));
    }
    let ring = app.key_ring();
    let Some(caller) = ring.keys.authenticate(headers) else {
        let why = why_unauthorized(headers);
        if let Some(left_out) = app.unauthorized.due(why, Instant::now()) {
            // Which sender, as far as the request tells: where it came from (through
            // a proxy, as the proxy says), its client and version.
            let header_text = |name: HeaderName| {
                (headers.get(name))
                    .map(|value| {
                        tally_runtime::loggable(&String::from_utf8_lossy(value.as_bytes()))
                    })
                    .unwrap_or_default()
            };
            let (forwarded_for, user_agent) =
                (header_text(FORWARDED_FOR), header_text(header::USER_AGENT));
            tracing::warn!(
                why,
                %client,
                forwarded_for = forwarded_for.as_str(),
                user_agent = user_agent.as_str(),
                left_out,
                "events refused: no valid API key (logged at most once a minute for each why; left_out: as many since)"
            );
        }
        let mut response = ErrorBody::new(
            "unauthorized",
            format!("{why}: send a valid API key as `Authorization: Bearer <key>` or `X-Api-Key: <key>`"),
        )
        .into_response(StatusCode::UNAUTHORIZED);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tally\""),
        );
        return Err(Refusal::BodyUnread(Box::new(response)));
    };
    let tenant = caller.key.tenant.as_str();
    if let Err(wait) = ring.limiter.check(caller.index, Instant::now()) {
        let seconds = retry_after_seconds(wait);
        tracing::debug!(tenant, retry_after = seconds, "events refused: rate limit");
        if let Some(left_out) = ring.rate_limited.due(caller.index, Instant::now()) {
            tracing::warn!(
                tenant,
                limit_per_second = app.rate_limit.0,
                left_out,
                "an API key is over its rate limit: its requests are refused with 429 until it slows down; send events in batches, or raise [ingest] rate_limit_per_second (logged at most once a minute for each key; left_out: as many since)"
            );
        }
        let body = ErrorBody::new(
            "rate_limited",
            format!(
                "this API key sent more requests than its rate limit allows; retry in {seconds} s (the limit counts requests, not events: send many events per request, as a batch)"
            ),
        );
        return Err(Refusal::BodyUnread(Box::new(with_retry_after(
            body.into_response(StatusCode::TOO_MANY_REQUESTS),
            seconds,
        ))));
    }
    let Some(kind) = body_kind(headers) else {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()));
        let content_type = content_type.map_or_else(|| "(none)".to_owned(), |c| format!("{c:?}"));
        let message = if is_binary_mode(headers) {
            format!("Content-Type {content_type} is not accepted for the data of a binary-mode event (ce- headers); send {BINARY_DATA_TYPES}, in UTF-8, or the event structured as {ACCEPTED_TYPES}")
        } else {
            format!("Content-Type {content_type} is not accepted; send {ACCEPTED_TYPES}, in UTF-8, or one event in binary mode (ce- headers)")
        };
        return Err(Refusal::BodyUnread(Box::new(
            ErrorBody::new("unsupported_media_type", message)
                .into_response(StatusCode::UNSUPPORTED_MEDIA_TYPE),
        )));
    };
    if let Some(coding) = (headers.get(header::CONTENT_ENCODING)).filter(|coding| {
        !coding
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"identity")
    }) {
        let mut response = ErrorBody::new(
            "unsupported_media_type",
            format!(
                "Content-Encoding {:?} is not accepted; send the body uncompressed",
                String::from_utf8_lossy(coding.as_bytes())
            ),
        )
        .into_response(StatusCode::UNSUPPORTED_MEDIA_TYPE);
        response.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        return Err(Refusal::BodyUnread(Box::new(response)));
    }
    if announced_over(headers, app.max_body_bytes) {
        return Err(Refusal::BodyTooLarge);
    }
    Ok((caller, kind))
}

/// A header that decides who sends or how the body is read, sent more than once:
/// ingest reads the first, and a proxy in front of it may read another.
fn repeated_header(headers: &HeaderMap) -> Option<&'static str> {
    let decisive = [
        ("Authorization", header::AUTHORIZATION),
        ("X-Api-Key", HeaderName::from_static("x-api-key")),
        ("Content-Type", header::CONTENT_TYPE),
        ("Content-Encoding", header::CONTENT_ENCODING),
    ];
    (decisive.into_iter())
        .find(|(_, name)| headers.get_all(name).iter().nth(1).is_some())
        .map(|(shown, _)| shown)
}

/// Whether `Content-Length` announces more than `limit` bytes.
fn announced_over(headers: &HeaderMap, limit: usize) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > limit as u64)
}

/// Answers a request refused before its body was read, after reading that body and
/// throwing it away. Answering first and leaving the body unread would close the
/// connection under the client: its pool would hand the closed connection to the next
/// request, which then fails. A body not worth waiting for (over `limit`, not there
/// within [`DISCARD_BODY_WAIT`], or held back for a `100 Continue` the refusal makes
/// pointless) is not read: the answer comes at once and closes the connection.
async fn discard_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    mut response: Response,
) -> Response {
    let waits_for_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let discarded = !waits_for_continue
        && !announced_over(headers, limit)
        && tokio::time::timeout(DISCARD_BODY_WAIT, drain(body, limit))
            .await
            .unwrap_or(false);
    if !discarded {
        close_after(&mut response);
    }
    response
}

/// Reads a body to its end, dropping each piece as it comes; false once it passes
/// `limit` bytes or cannot be read.
async fn drain(mut body: Body, limit: usize) -> bool {
    let mut seen = 0;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return false;
        };
        seen += frame.data_ref().map_or(0, Bytes::len);
        if seen > limit {
            return false;
        }
    }
    true
}

/// Tells the client the connection ends with this answer, so it does not send another
/// request on it.
fn close_after(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Checks, produces and answers for the events of one request.
/// `hint` is added to a single event's rejection (see [`single_event_hint`]).
async fn ingest(app: &App, caller: Caller, events: &Events<'_>, hint: Option<&str>) -> Response {
    let tenant = caller.key.tenant.as_str();
    let largest = app.producer.max_record_bytes(tenant);
    let verdicts = match check_events(
        &app.config,
        chrono::Utc::now(),
        &caller.key,
        largest,
        events.as_slice(),
    ) {
        Ok(verdicts) => verdicts,
        Err(forbidden) => {
            if let Some(left_out) = app.key_ring().forbidden.due(caller.index, Instant::now()) {
                let source = tally_runtime::loggable(&forbidden.source);
                tracing::warn!(
                    tenant,
                    source = source.as_str(),
                    index = forbidden.index,
                    left_out,
                    "events refused: source not allowed for the key (logged at most once a minute for each key; left_out: as many since)"
                );
            }
            return forbidden_source(&forbidden);
        }
    };

    let records: Vec<Record<'_>> = verdicts
        .iter()
        .filter_map(|v| match &v.kind {
            VerdictKind::Accept { subject, .. } => Some(Record {
                key: subject.as_bytes(),
                value: v.bytes,
                tenant,
            }),
            _ => None,
        })
        .collect();
    if !records.is_empty() {
        let started = Instant::now();
        if let Err(e) = app.producer.produce_all(&records).await {
            // While Kafka is away the readiness probe has said so once already.
            if let ProduceError::Unreachable(_) = e {
                tracing::debug!(tenant, events = records.len(), error = %e, "answered 503");
            } else {
                tracing::warn!(
                    tenant,
                    events = records.len(),
                    error = %e,
                    "events not acknowledged by kafka; answered 503"
                );
            }
            let body = ErrorBody::new(
                "kafka_unavailable",
                format!(
                    "{e}. Nothing from this request is guaranteed to be stored; retry the whole request later (resending is safe: events are deduplicated on (source, id))"
                ),
            );
            return with_retry_after(
                body.into_response(StatusCode::SERVICE_UNAVAILABLE),
                KAFKA_RETRY_AFTER_SECONDS,
            );
        }
        app.metrics.produced(started.elapsed());
    }

    let mut results = Vec::with_capacity(verdicts.len());
    let (mut accepted, mut rejected, mut duplicates) = (0, 0, 0);
    let mut bytes_of = Vec::with_capacity(verdicts.len());
    for (index, verdict) in verdicts.into_iter().enumerate() {
        bytes_of.push(verdict.bytes);
        let status = match verdict.kind {
            VerdictKind::Accept { unbilled, .. } => {
                accepted += 1;
                if let Some(unbilled) = &unbilled {
                    app.metrics.unbilled(unbilled);
                }
                EventStatus::accepted(unbilled.as_ref())
            }
            VerdictKind::Duplicate { of } => {
                duplicates += 1;
                EventStatus::DuplicateInBatch { duplicate_of: of }
            }
            VerdictKind::Conflict { of } => {
                rejected += 1;
                let error = EventError {
                    field: "id".to_owned(),
                    problem: Problem::Conflict,
                };
                app.metrics.rejected(&error);
                EventStatus::Rejected {
                    field: error.field,
                    code: error.problem.code(),
                    reason: format!("event {of} of this request has this source and id and other content; {RESEND_ADVICE}"),
                }
            }
            VerdictKind::Reject(error) => {
                rejected += 1;
                app.metrics.rejected(&error);
                tracing::debug!(tenant, index, field = %error.field, code = error.problem.code(), "event rejected");
                EventStatus::rejected(&error, hint)
            }
        };
        results.push(EventResult {
            index,
            id: verdict.id,
            status,
        });
    }
    // Kept once the request's events are stored: a request answered 503 is sent again,
    // and its refusals with it.
    let refused: Vec<Refused<'_>> = (results.iter())
        .filter_map(|result| match &result.status {
            EventStatus::Rejected {
                field,
                code,
                reason,
            } => Some(Refused {
                value: bytes_of[result.index],
                tenant,
                index: result.index,
                code,
                field,
                reason,
            }),
            _ => None,
        })
        .collect();
    (app.producer).keep_refused(&refused, &app.metrics.rejected_copies_lost);
    app.metrics.events(Outcome::Accepted, accepted);
    app.metrics.events(Outcome::DuplicateInBatch, duplicates);
    app.metrics.events(Outcome::Rejected, rejected);
    tracing::debug!(tenant, accepted, rejected, duplicates, "events ingested");
    let status = if events.is_single() && rejected > 0 {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::ACCEPTED
    };
    json(
        status,
        &EventsResponse {
            accepted,
            rejected,
            duplicates,
            results,
        },
    )
}

/// 403 for a request with an event of a source its key may not send.
fn forbidden_source(forbidden: &Forbidden) -> Response {
    ErrorBody::new(
        "forbidden_source",
        format!(
            "this API key may not send events with source {:?} (event {}); nothing of this request was stored",
            forbidden.source, forbidden.index
        ),
    )
    .at(forbidden.index)
    .into_response(StatusCode::FORBIDDEN)
}

/// 413 for a body over the limit, after which the connection is closed: what is left
/// of the body past [`OVER_LIMIT_READ`] stays unread.
fn too_large(max_body_bytes: usize) -> Response {
    let mut response = ErrorBody::new(
        "payload_too_large",
        format!("the request body is larger than the {max_body_bytes} bytes allowed; send fewer events per request (an event this large on its own is refused however it is sent: usage data is a few numbers and names, not a payload)"),
    )
    .into_response(StatusCode::PAYLOAD_TOO_LARGE);
    close_after(&mut response);
    response
}

enum ReadError {
    TooLarge,
    TooSlow,
    Failed(String),
}

/// Reads the body, keeping none of it once it passes `limit` bytes, whatever
/// `Content-Length` said (or if it said nothing, as with chunked bodies), and reading
/// on to throw away up to [`OVER_LIMIT_READ`] more; or stops once it has taken
/// [`BODY_READ_WAIT`].
async fn read_body(mut body: Body, limit: usize) -> Result<Bytes, ReadError> {
    let read = Limited::new(&mut body, limit).collect();
    match tokio::time::timeout(BODY_READ_WAIT, read).await {
        Err(_) => Err(ReadError::TooSlow),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            // Whether the rest all came does not change the answer.
            let rest = drain(body, OVER_LIMIT_READ);
            let _ = tokio::time::timeout(DISCARD_BODY_WAIT, rest).await;
            Err(ReadError::TooLarge)
        }
        Ok(Err(e)) => Err(ReadError::Failed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::ROUTES;
    use serde_json::Value;

    fn document() -> Value {
        serde_json::from_str(include_str!("../../openapi.json")).unwrap()
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_routes_served() {
        let document = document();
        assert_eq!(document["openapi"], "3.1.0");
        let mut documented: Vec<&str> = document["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        documented.sort_unstable();
        let mut served = ROUTES.to_vec();
        served.sort_unstable();
        assert_eq!(documented, served);
    }

    #[test]
    fn the_openapi_document_describes_every_answer_of_post_events() {
        let document = document();
        let post = &document["paths"]["/v1/events"]["post"];
        let mut statuses: Vec<&str> = post["responses"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        statuses.sort_unstable();
        assert_eq!(
            statuses,
            ["202", "400", "401", "403", "408", "413", "415", "422", "429", "503"]
        );
        let content = post["requestBody"]["content"].as_object().unwrap();
        for media_type in [
            "application/cloudevents+json",
            "application/cloudevents-batch+json",
            "application/json",
        ] {
            assert!(content.contains_key(media_type), "{media_type}");
        }
        // Every error example uses a code the Error schema lists, and every status
        // has an example.
        let codes = &document["components"]["schemas"]["Error"]["properties"]["error"]["enum"];
        for (status, response) in post["responses"].as_object().unwrap() {
            let examples = response["content"]["application/json"]["examples"]
                .as_object()
                .unwrap_or_else(|| panic!("{status} has no examples"));
            assert!(!examples.is_empty(), "{status}");
            for example in examples.values() {
                if let Some(code) = example["value"].get("error") {
                    assert!(codes.as_array().unwrap().contains(code), "{status}: {code}");
                }
            }
        }
        for scheme in ["bearer", "apiKeyHeader"] {
            assert!(document["components"]["securitySchemes"][scheme].is_object());
        }
    }
}
