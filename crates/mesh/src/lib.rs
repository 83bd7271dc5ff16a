//! pillion's security parts that are not plain HTTP:
//!
//! - [`jwt`] verifies bearer tokens against a JWKS (a file or a URL, read again on an
//!   unknown key) and hands the app the token's subject; gateway mode on `--listen`.
//! - [`fetch`] reads one small document over HTTP or HTTPS (a JWKS URL).
//!
//! mTLS between sidecars, identities and ACME are not built yet.
#![forbid(unsafe_code)]

pub mod fetch;
pub mod jwt;
