//! Shutdown: one small type every task can wait on.
//!
//! The first SIGTERM or SIGINT starts a graceful shutdown (stop accepting, let
//! in-flight work finish within the grace period, deregister); a second one exits at
//! once.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Starts the graceful stop of what waits on the [`Shutdown`] made with it.
#[derive(Clone)]
pub struct Stopper(Arc<watch::Sender<bool>>);

impl Stopper {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// The first SIGTERM or SIGINT calls `stopper`; a second one exits at once. Must be
/// called within the runtime.
pub fn on_signals(stopper: Stopper) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutting down gracefully; send the signal again to exit at once"
        );
        stopper.stop();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    Ok(())
}

impl Shutdown {
    /// A shutdown that begins when its [`Stopper`] says so.
    pub fn new() -> (Stopper, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Stopper(Arc::new(tx)), Shutdown { rx })
    }

    /// A shutdown that begins on the first SIGTERM or SIGINT (see [`on_signals`]).
    pub fn on_signals() -> std::io::Result<Shutdown> {
        let (stopper, shutdown) = Shutdown::new();
        on_signals(stopper)?;
        Ok(shutdown)
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
