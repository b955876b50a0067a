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

    /// Requests shutdown on SIGINT or SIGTERM. Call from within a Tokio runtime.
    pub fn on_signals(&self) {
        let shutdown = self.clone();
        tokio::spawn(async move {
            let interrupt = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::terminate()) {
                    Ok(mut terminate) => {
                        tokio::select! {
                            _ = interrupt => {}
                            _ = terminate.recv() => {}
                        }
                    }
                    Err(_) => {
                        let _ = interrupt.await;
                    }
                }
            }
            #[cfg(not(unix))]
            let _ = interrupt.await;
            tracing::info!("shutdown requested by signal; finishing in-flight work");
            shutdown.request();
        });
    }
}
