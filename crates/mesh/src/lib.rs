//! pillion's security parts that are not plain HTTP:
//!
//! - [`ca`]: the mesh's certificate authority (`pillion mesh init`) and the
//!   certificates it signs.
//! - [`issuer`]: `pillion mesh serve`, the one place the CA key is kept: it grants a
//!   sidecar's certification request for the service its join token names; [`client`]
//!   is the sidecar's side.
//! - [`identity`]: this sidecar's mesh identity, `spiffe://pillion/svc/<service>`,
//!   renewed at two thirds of its life, and the mTLS configs that present it and
//!   check the peer's; [`der`] reads the identity out of a certificate (with
//!   [`pillion_http::x509`], which ACME uses too).
//! - [`inbound`]: the mesh listener's side of a call: allow list, `X-Pillion-Caller`,
//!   distributed JWT, and the forward to the app (HTTP or a TCP tunnel).
//! - [`policy`]: the `[mesh]` rules (caller, method, path, JWT subject and scopes ->
//!   allow or deny, with an audit mode) and the rate limits of both listeners.
//! - [`jwt`] verifies bearer tokens against a JWKS (a file or a URL, read again
//!   periodically and on an unknown key) and hands the app the token's subject.
//! - [`acme`]: certificates for HTTPS on `--listen` from an ACME CA such as Let's
//!   Encrypt, validated by TLS-ALPN-01 on that listener, cached and renewed.
#![forbid(unsafe_code)]

pub mod acme;
pub mod ca;
pub mod client;
pub mod der;
pub mod identity;
pub mod inbound;
pub mod issuer;
pub mod jwt;
pub mod policy;
