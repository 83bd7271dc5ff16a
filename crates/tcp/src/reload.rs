//! Following the config file: it is read again when it changes (polled every
//! `period`) or at once on SIGHUP, and its `[[tcp]]` listeners are applied.
//!
//! What is read is judged before anything is applied ([`judge`]):
//! - an empty file (no byte, or only whitespace) is an editor's write in progress,
//!   not a wish to remove every listener: the running configuration stays, with a
//!   warning;
//! - an invalid file is reported with its line, and the running configuration stays;
//! - a file whose listeners equal the running ones changes nothing and logs nothing
//!   (a SIGHUP out of habit, a comment edited);
//! - anything else is applied, and logged once.
//!
//! Keys other than `[[tcp]]` take effect at the next start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{validate, ListenerConfig};
use crate::TcpProxy;

/// What a reading of the file means for the running listeners.
#[derive(Debug, PartialEq, Eq)]
pub enum Reading {
    /// No byte but whitespace: keep the running configuration.
    Empty,
    /// Unparsable or invalid: keep the running configuration.
    Invalid(String),
    /// The same listeners as the running ones.
    Unchanged,
    /// Listeners to apply.
    Changed(Vec<ListenerConfig>),
}

/// Judges the file's `text` against the `running` listeners; `parse` reads the
/// file's `[[tcp]]` sections (the caller owns the rest of the file's format).
pub fn judge(
    text: &str,
    running: &[ListenerConfig],
    parse: impl Fn(&str) -> Result<Vec<ListenerConfig>, String>,
) -> Reading {
    if text.trim().is_empty() {
        return Reading::Empty;
    }
    let listeners = match parse(text).and_then(|l| validate(&l).map(|()| l)) {
        Ok(l) => l,
        Err(e) => return Reading::Invalid(e),
    };
    if listeners == running {
        Reading::Unchanged
    } else {
        Reading::Changed(listeners)
    }
}

/// Follows `file` until the task is dropped; see the module's comment.
pub async fn follow<P>(file: PathBuf, period: Duration, tcp: Arc<TcpProxy>, parse: P)
where
    P: Fn(&str) -> Result<Vec<ListenerConfig>, String> + Send + 'static,
{
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP; the file is still polled");
            None
        }
    };
    let mut seen = stamp(&file);
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(period) => false,
            _ = async {
                match hup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => true,
        };
        let now = stamp(&file);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        let shown = file.display();
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(
                    "cannot read config file {shown}: {e}; keeping the running configuration"
                );
                continue;
            }
        };
        match judge(&text, &tcp.running(), &parse) {
            Reading::Empty => tracing::warn!(
                file = %shown,
                "config file is empty (a write in progress?); keeping the running configuration. \
                 To remove every tcp listener, leave no [[tcp]] section in it"
            ),
            Reading::Invalid(e) => {
                tracing::error!("config file {shown}: {e}; keeping the running configuration")
            }
            Reading::Unchanged => {
                tracing::debug!(file = %shown, "config file read; its tcp listeners are unchanged")
            }
            Reading::Changed(listeners) => match tcp.apply(&listeners).await {
                Ok(()) => {
                    tracing::info!(file = %shown, listeners = listeners.len(), "configuration reloaded")
                }
                Err(e) => tracing::error!(
                    file = %shown,
                    error = %e,
                    "configuration reloaded, but not every listener could start"
                ),
            },
        }
    }
}

/// When the file was last written, and its size: a write that lands within the
/// clock's resolution of the previous one still changes the size.
fn stamp(file: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(file).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        tcp: Vec<ListenerConfig>,
    }

    fn parse(text: &str) -> Result<Vec<ListenerConfig>, String> {
        toml::from_str::<File>(text)
            .map(|f| f.tcp)
            .map_err(|e| e.to_string())
    }

    const ONE: &str =
        "[[tcp]]\nlisten = \"127.0.0.1:7000\"\n[[tcp.tiers]]\ntargets = [\"127.0.0.1:7001\"]\n";

    #[test]
    fn an_emptied_file_keeps_the_running_listeners() {
        let running = parse(ONE).unwrap();
        assert_eq!(judge("", &running, parse), Reading::Empty);
        assert_eq!(judge(" \n\t\n", &running, parse), Reading::Empty);
        // A file left without [[tcp]] on purpose does remove them.
        assert_eq!(
            judge("# no listeners\n", &running, parse),
            Reading::Changed(vec![])
        );
    }

    #[test]
    fn the_same_listeners_are_unchanged_whatever_the_comments() {
        let running = parse(ONE).unwrap();
        assert_eq!(judge(ONE, &running, parse), Reading::Unchanged);
        let commented = format!("# edited\n{ONE}# more\n");
        assert_eq!(judge(&commented, &running, parse), Reading::Unchanged);
        let other = ONE.replace("7001", "7002");
        assert_eq!(
            judge(&other, &running, parse),
            Reading::Changed(parse(&other).unwrap())
        );
    }

    #[test]
    fn an_invalid_file_is_reported_not_applied() {
        let running = parse(ONE).unwrap();
        let Reading::Invalid(e) = judge("[[tcp]]\nlisten = 3\n", &running, parse) else {
            panic!("accepted");
        };
        assert!(e.contains("listen"), "{e}");
        let Reading::Invalid(e) = judge("[[tcp]]\nlisten = \"127.0.0.1:1\"\n", &running, parse)
        else {
            panic!("accepted");
        };
        assert!(e.contains("has no [[tcp.tiers]]"), "{e}");
    }
}
