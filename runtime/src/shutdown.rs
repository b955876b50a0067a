//! One shutdown signal for every task and thread of a process: set once (by SIGINT,
//! SIGTERM or a caller), seen by synchronous loops through [`Shutdown::is_requested`]
//! and by async tasks through [`Shutdown::requested`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often [`Shutdown::sleep`] looks for a request: well within what an operator or
/// an orchestrator's stop notices.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct Shutdown {
    sender: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown {
            sender: Arc::new(watch::channel(false).0),
        }
    }

    pub fn request(&self) {
        self.sender.send_replace(true);
    }

    pub fn is_requested(&self) -> bool {
        *self.sender.borrow()
    }

    /// Sleeps for `duration`, or less if shutdown is requested meanwhile, for a
    /// synchronous loop's wait between retries: a SIGTERM during a 5 s back-off stops
    /// the service at once rather than after it. Returns whether shutdown was requested.
    pub fn sleep(&self, duration: Duration) -> bool {
        let until = Instant::now() + duration;
        while !self.is_requested() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            std::thread::sleep(left.min(SHUTDOWN_POLL));
        }
        true
    }

    /// Resolves once shutdown is requested.
    pub async fn requested(&self) {
        let mut receiver = self.sender.subscribe();
        // Err only if the sender is gone, which `self` prevents.
        let _ = receiver.wait_for(|requested| *requested).await;
    }

    /// Requests shutdown on SIGINT or SIGTERM, and stops the process at once on a
    /// second one: finishing in-flight work can take minutes (a restore, a rebuild), and
    /// an operator who signals again means it. Stopping then is as safe as a crash:
    /// what was not committed is read again on restart. Call from within a Tokio
    /// runtime.
    pub fn on_signals(&self) {
        let shutdown = self.clone();
        tokio::spawn(async move {
            let mut signals = Signals::new();
            signals.next().await;
            tracing::info!(
                "shutdown requested by signal; finishing in-flight work (signal again to stop at once)"
            );
            shutdown.request();
            signals.next().await;
            tracing::warn!(
                "second signal: stopping at once; what was not committed is read again on restart"
            );
            std::process::exit(130);
        });
    }
}

/// SIGINT and, on Unix, SIGTERM, one after another.
struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        Signals {
            #[cfg(unix)]
            terminate: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .ok(),
        }
    }

    async fn next(&mut self) {
        let interrupt = tokio::signal::ctrl_c();
        #[cfg(unix)]
        if let Some(terminate) = &mut self.terminate {
            tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            }
            return;
        }
        let _ = interrupt.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleep_ends_when_shutdown_is_requested_and_says_so() {
        let shutdown = Shutdown::new();
        let requester = shutdown.clone();
        let started = Instant::now();
        let signal = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            requester.request();
        });
        assert!(shutdown.sleep(Duration::from_secs(60)));
        assert!(started.elapsed() < Duration::from_secs(5));
        signal.join().expect("the requesting thread");
        // Once requested, a sleep does not wait at all.
        assert!(shutdown.sleep(Duration::from_secs(60)));
    }

    #[test]
    fn a_sleep_without_a_request_lasts_its_duration() {
        let started = Instant::now();
        assert!(!Shutdown::new().sleep(Duration::from_millis(120)));
        assert!(started.elapsed() >= Duration::from_millis(120));
    }
}
