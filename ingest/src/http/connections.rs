//! Accepting connections, with the limits a public endpoint needs.
//!
//! In: the bound listener and the router. Out: each connection served (HTTP/1.1)
//! until it ends; once shutdown is requested, no new connections, and those open
//! finish the request they are on. A client that sends nothing, or its headers a few
//! bytes at a time, is closed after [`HEADER_READ_TIMEOUT`], one that stops reading its
//! answers after [`WRITE_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are served at
//! once, so idle or slow clients cannot use up the process's file descriptors.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutWriter;
use tower::ServiceExt;

/// Longest a client may take to send a request's headers, counted from when the
/// connection opens or its previous answer was sent: it closes an idle keep-alive
/// connection as well.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest an answer's write may wait for the client to read. A client that pipelines
/// requests and never reads the answers (`/metrics`', say, far larger than the
/// request) would otherwise hold its connection, and a slot of [`MAX_CONNECTIONS`],
/// for ever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once. Past it the listener stops accepting until one closes
/// (new ones wait in the kernel's backlog). The process's file-descriptor limit must
/// be above it, with room for Kafka's sockets: a container's usually is (Docker's
/// default is 1,048,576); systemd's default soft limit of 1024 is not (raise
/// `LimitNOFILE`), or accepting fails, and is retried, once descriptors run out.
pub const MAX_CONNECTIONS: usize = 10_000;

/// How long accepting pauses after it failed (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `shutdown` completes, then waits for the open
/// connections to finish their requests.
pub async fn serve_connections(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let open = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // That client's connection failed before it was taken: the next one
                // is no concern of it.
                Err(error) if is_connection_error(&error) => {
                    tracing::debug!(%error, "a connection ended before it was accepted");
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a connection; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Handlers see the client's address (`ConnectInfo`), for the logs.
        let service = TowerToHyperService::new(router.clone().map_request(
            move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            },
        ));
        let mut stream = TimeoutWriter::new(stream);
        stream.set_timeout(Some(WRITE_TIMEOUT));
        let stream = TokioIo::new(Box::pin(stream));
        let connection = open.watch(http.serve_connection(stream, service));
        tokio::spawn(async move {
            // A client that went away or timed out: nothing to answer.
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    open.shutdown().await;
}

/// Whether an accept error concerns one connection only, rather than the listener
/// (out of file descriptors, say).
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}
