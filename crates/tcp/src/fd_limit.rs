//! The process's open-file limit. Every proxied connection holds two sockets and,
//! on Linux, two pipes; the usual soft limit of 1024 would cap the proxy at about 170
//! connections while the hard limit (often 64k or more) allows far more. The soft
//! limit is raised to the hard one once, when the proxy starts. This module and
//! [`crate::copy`] are the crate's only `unsafe` code.
#![allow(unsafe_code)]

use std::sync::OnceLock;

/// The soft and hard `RLIMIT_NOFILE` after raising the soft one to the hard one; done
/// once per process, later calls answer the first result.
pub fn raise_to_hard_limit() -> Result<(u64, u64), String> {
    static RESULT: OnceLock<Result<(u64, u64), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            let raised = raise();
            match &raised {
                Ok((soft, hard)) => {
                    tracing::debug!(soft, hard, "open file limit raised to the hard limit")
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot raise the open file limit; connections beyond it will be refused"
                ),
            }
            raised
        })
        .clone()
}

#[cfg(unix)]
fn raise() -> Result<(u64, u64), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    if limit.rlim_cur < limit.rlim_max {
        let wanted = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass, which lives for the call;
        // raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } != 0 {
            return Err(format!(
                "setrlimit to {}: {} (the limit stays {})",
                limit.rlim_max,
                std::io::Error::last_os_error(),
                limit.rlim_cur
            ));
        }
        limit = wanted;
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

#[cfg(not(unix))]
fn raise() -> Result<(u64, u64), String> {
    Err("not supported on this platform".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let (soft, hard) = super::raise_to_hard_limit().unwrap();
        assert_eq!(soft, hard);
        assert_eq!(super::raise_to_hard_limit().unwrap(), (soft, hard));
    }
}
