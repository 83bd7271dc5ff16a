//! Shutdown: one small type every task can wait on.
//!
//! The first SIGTERM or SIGINT starts a graceful shutdown (stop accepting, let
//! in-flight work finish within the grace period, deregister); a second one exits at
//! once.

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Installs the signal handlers. Must be called within the runtime.
    pub fn on_signals() -> std::io::Result<Shutdown> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(
                signal = name,
                "shutting down gracefully; send the signal again to exit at once"
            );
            let _ = tx.send(true);
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        });
        Ok(Shutdown { rx })
    }

    /// Resolves once shutdown has begun.
    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|down| *down).await;
    }

    /// [`Shutdown::wait`] as an owned future, for a task to hold.
    pub async fn begun(mut self) {
        self.wait().await
    }
}
