//! One shutdown signal for every task and thread of a process: set once (by SIGINT,
//! SIGTERM or a caller), seen by synchronous loops through [`Shutdown::is_requested`]
//! and by async tasks through [`Shutdown::requested`].

use std::sync::Arc;

use tokio::sync::watch;

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
