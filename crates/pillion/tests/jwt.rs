//! JWT at the edge (gateway mode): tokens signed with RS256, ES256 and EdDSA keys
//! from a JWKS are verified on --listen; the app sees the subject, never a client's
//! forgery of it; every bad token gets 401 (one without a configured claim, one whose
//! subject cannot be a header); a rotated key is found by reading the JWKS again, and
//! a removed one is no longer trusted after the periodic refresh.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{inbound, run_to_end};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pillion_testkit::http::request;
use pillion_testkit::TestApp;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

const ISSUER: &str = "https://id.example";
const AUDIENCE: &str = "orders";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pillion-jwt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A signing key and its public JWK.
struct Signer {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: serde_json::Value,
}

fn ed25519(kid: &str) -> Signer {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    Signer {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        key: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: serde_json::json!({"kty":"OKP","crv":"Ed25519","kid":kid,"x":b64(pair.public_key().as_ref())}),
    }
}

fn es256(kid: &str) -> Signer {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref(); // 0x04 || x || y
    Signer {
        kid: kid.into(),
        alg: Algorithm::ES256,
        key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: serde_json::json!({"kty":"EC","crv":"P-256","kid":kid,"x":b64(&point[1..33]),"y":b64(&point[33..])}),
    }
}

fn rs256(kid: &str, dir: &Path) -> Signer {
    let key = dir.join(format!("{kid}.pem"));
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .output()
        .expect("openssl is needed");
    assert!(ok.status.success());
    let modulus = Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    let hex = String::from_utf8(modulus.stdout).unwrap();
    let hex = hex.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    Signer {
        kid: kid.into(),
        alg: Algorithm::RS256,
        key: EncodingKey::from_rsa_pem(&std::fs::read(&key).unwrap()).unwrap(),
        jwk: serde_json::json!({"kty":"RSA","kid":kid,"n":b64(&n),"e":"AQAB"}),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(signer: &Signer, claims: serde_json::Value) -> String {
    let mut header = Header::new(signer.alg);
    header.kid = Some(signer.kid.clone());
    encode(&header, &claims, &signer.key).unwrap()
}

fn good(sub: &str) -> serde_json::Value {
    serde_json::json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600})
}

/// A JWKS of these signers' public keys.
fn jwks_body(signers: &[&Signer]) -> String {
    let keys: Vec<_> = signers.iter().map(|s| s.jwk.clone()).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

fn write_jwks(path: &Path, signers: &[&Signer]) {
    std::fs::write(path, jwks_body(signers)).unwrap();
}

/// A gateway on --listen in front of `app` that checks tokens against the JWKS file
/// `jwks`, for [`ISSUER`] and [`AUDIENCE`], with `extra` flags.
fn gateway(app: &TestApp, jwks: &Path, extra: &[&str]) -> (common::Sidecar, std::net::SocketAddr) {
    let jwks = jwks.to_str().unwrap();
    let flags = [
        "--jwt-jwks",
        jwks,
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
    ];
    inbound(&app.url(), &[&flags[..], extra].concat())
}

/// GET through the gateway with these headers: (status, what the app saw or the error).
async fn call(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let reply = request(
        http::Method::GET,
        &format!("http://{addr}/orders"),
        headers,
        String::new(),
    )
    .await
    .unwrap();
    (reply.status.as_u16(), reply.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_verifies_tokens_and_tells_the_app_who_called() {
    let d = dir("gateway");
    let (rsa, ec, ed) = (rs256("rsa-1", &d), es256("ec-1"), ed25519("ed-1"));
    let jwks = d.join("jwks.json");
    write_jwks(&jwks, &[&rsa, &ec, &ed]);
    let app = TestApp::start("app").await;
    let (_sc, addr) = gateway(&app, &jwks, &["--jwt-required"]);
    for (signer, sub) in [(&rsa, "alice"), (&ec, "bob"), (&ed, "carol")] {
        let auth = format!("Bearer {}", token(signer, good(sub)));
        let (status, seen) = call(
            addr,
            &[("authorization", &auth), ("x-pillion-subject", "root")],
        )
        .await;
        assert_eq!(status, 200, "{:?}: {seen}", signer.alg);
        assert_eq!(seen["headers"]["x-pillion-subject"], sub, "{seen}");
    }
    let bad = |claims: serde_json::Value| format!("Bearer {}", token(&ed, claims));
    let cases = [
        ("missing", String::new()),
        (
            "expired",
            bad(serde_json::json!({"sub":"x","iss":ISSUER,"aud":AUDIENCE,"exp":now() - 3600})),
        ),
        (
            "wrong issuer",
            bad(
                serde_json::json!({"sub":"x","iss":"https://evil","aud":AUDIENCE,"exp":now() + 600}),
            ),
        ),
        (
            "wrong audience",
            bad(serde_json::json!({"sub":"x","iss":ISSUER,"aud":"billing","exp":now() + 600})),
        ),
        ("garbage", "Bearer not.a.jwt".to_string()),
        ("tampered", {
            let t = token(&ed, good("alice"));
            let (head, _) = t.rsplit_once('.').unwrap();
            format!("Bearer {head}.{}", b64(&[0u8; 64]))
        }),
    ];
    for (what, auth) in cases {
        let headers: Vec<(&str, &str)> = if auth.is_empty() {
            vec![]
        } else {
            vec![("authorization", auth.as_str())]
        };
        let (status, body) = call(addr, &headers).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["id"], "pillion.jwt", "{what}: {body}");
    }
    // An RS256 token presented as signed by the EC key's kid: alg confusion refused.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("ec-1".into());
    let confused = encode(&header, &good("mallory"), &rsa.key).unwrap();
    let (status, body) = call(addr, &[("authorization", &format!("Bearer {confused}"))]).await;
    assert_eq!(status, 401, "{body}");

    // Key rotation: a token from a key added to the JWKS later is accepted once the
    // set is read again (on the unknown kid).
    let rotated = ed25519("ed-2");
    write_jwks(&jwks, &[&rsa, &ec, &ed, &rotated]);
    tokio::time::sleep(pillion_mesh::jwt::REFRESH_GAP).await;
    let auth = format!("Bearer {}", token(&rotated, good("dave")));
    let (status, seen) = call(addr, &[("authorization", &auth)]).await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["headers"]["x-pillion-subject"], "dave");
    let _ = std::fs::remove_dir_all(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_claim_is_required_and_a_subject_with_a_line_break_is_refused() {
    let d = dir("claims");
    let ed = ed25519("ed-1");
    let jwks = d.join("jwks.json");
    write_jwks(&jwks, &[&ed]);
    let app = TestApp::start("app").await;
    let (_sc, addr) = gateway(&app, &jwks, &[]);
    let without = |claim: &str| {
        let mut claims = good("alice");
        claims.as_object_mut().unwrap().remove(claim);
        format!("Bearer {}", token(&ed, claims))
    };
    let cases = [
        ("no iss", without("iss"), "iss"),
        ("no aud", without("aud"), "aud"),
        (
            "CR LF in sub",
            format!(
                "Bearer {}",
                token(&ed, good("alice\r\nx-pillion-caller: billing"))
            ),
            "sub",
        ),
        (
            "LF in sub",
            format!("Bearer {}", token(&ed, good("alice\nadmin"))),
            "sub",
        ),
    ];
    for (what, auth, named) in cases {
        let (status, body) = call(addr, &[("authorization", &auth)]).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["id"], "pillion.jwt", "{what}: {body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(named), "{what}: {body}");
    }
    assert_eq!(app.requests(), 0, "no refused call reached the app");
    let auth = format!("Bearer {}", token(&ed, good("alice")));
    let (status, seen) = call(addr, &[("authorization", &auth)]).await;
    assert_eq!(status, 200, "every configured claim present: {seen}");
    assert_eq!(seen["headers"]["x-pillion-subject"], "alice");
    let _ = std::fs::remove_dir_all(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_removed_from_the_jwks_stops_being_trusted_at_the_next_refresh() {
    let (kept, removed) = (ed25519("ed-kept"), ed25519("ed-removed"));
    let both = jwks_body(&[&kept, &removed]);
    let app = TestApp::start("app").await;
    // One sidecar refreshes every second by its flag; the other keeps the default of
    // minutes, but its URL says `max-age=1`.
    let by_flag =
        common::Document::serve(&[("content-type", "application/json")], both.clone()).await;
    let by_max_age = common::Document::serve(&[("cache-control", "public, max-age=1")], both).await;
    let (_a, flag_addr) = inbound(
        &app.url(),
        &[
            "--jwt-jwks",
            &by_flag.url("/jwks.json"),
            "--jwt-jwks-refresh",
            "1s",
        ],
    );
    let (_b, max_age_addr) = inbound(&app.url(), &["--jwt-jwks", &by_max_age.url("/jwks.json")]);
    let bearer = |signer: &Signer| format!("Bearer {}", token(signer, good("alice")));
    for addr in [flag_addr, max_age_addr] {
        for signer in [&kept, &removed] {
            let (status, seen) = call(addr, &[("authorization", &bearer(signer))]).await;
            assert_eq!(status, 200, "{}: {seen}", signer.kid);
        }
    }

    by_flag.set(&[("content-type", "application/json")], jwks_body(&[&kept]));
    by_max_age.set(
        &[("cache-control", "public, max-age=1")],
        jwks_body(&[&kept]),
    );
    for (what, addr) in [
        ("--jwt-jwks-refresh 1s", flag_addr),
        ("max-age=1", max_age_addr),
    ] {
        let revoked = common::eventually(std::time::Duration::from_secs(10), || async {
            call(addr, &[("authorization", &bearer(&removed))]).await.0 == 401
        })
        .await;
        assert!(
            revoked,
            "{what}: the removed key was still trusted after 10 s"
        );
        let (status, body) = call(addr, &[("authorization", &bearer(&removed))]).await;
        assert_eq!(body["id"], "pillion.jwt", "{what}: {body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("ed-removed"),
            "{what}: {status} {body}"
        );
        let (status, seen) = call(addr, &[("authorization", &bearer(&kept))]).await;
        assert_eq!(status, 200, "{what}: the kept key still works: {seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_required_an_anonymous_call_passes_with_no_subject() {
    let d = dir("optional");
    let ed = ed25519("ed-1");
    let jwks = d.join("jwks.json");
    write_jwks(&jwks, &[&ed]);
    let app = TestApp::start("app").await;
    let (_sc, addr) = inbound(&app.url(), &["--jwt-jwks", jwks.to_str().unwrap()]);
    let (status, seen) = call(addr, &[("x-pillion-subject", "forged")]).await;
    assert_eq!(status, 200);
    assert!(seen["headers"]["x-pillion-subject"].is_null(), "{seen}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn unusable_jwt_options_are_refused_at_start() {
    let d = dir("bad");
    let empty = d.join("empty.json");
    std::fs::write(&empty, r#"{"keys":[]}"#).unwrap();
    let base = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--app",
        "http://127.0.0.1:9",
    ];
    let (code, _, err) = run_to_end(
        &[&base[..], &["--jwt-jwks", empty.to_str().unwrap()]].concat(),
        &[],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("--jwt-jwks") && err.contains("no RS256, ES256 or EdDSA key"),
        "{err}"
    );
    let (code, _, err) = run_to_end(&[&base[..], &["--jwt-issuer", ISSUER]].concat(), &[]);
    assert_ne!(code, 0);
    assert!(err.contains("needs --jwt-jwks"), "{err}");
    let (code, _, err) = run_to_end(&[&base[..], &["--jwt-jwks", "ftp://x/jwks"]].concat(), &[]);
    assert_ne!(code, 0);
    assert!(err.contains("http(s)"), "{err}");
    let _ = std::fs::remove_dir_all(d);
}

/// Distributed mode: the token travels with a call by name, and the receiving
/// service's sidecar verifies it on --mesh-listen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_travelling_with_a_call_are_verified_by_the_receiving_sidecar() {
    let d = dir("distributed");
    let ed = ed25519("ed-1");
    let jwks = d.join("jwks.json");
    write_jwks(&jwks, &[&ed]);
    let ca = common::mesh_ca("jwt");
    let app = TestApp::start("orders").await;
    let jwks_arg = jwks.display().to_string();
    let orders = common::mesh_receiver(
        &ca,
        "orders",
        app.addr(),
        &[
            "--jwt-jwks",
            &jwks_arg,
            "--jwt-issuer",
            ISSUER,
            "--jwt-audience",
            AUDIENCE,
            "--jwt-required",
        ],
    );
    let front = common::mesh_caller(&orders, Some((&ca, "front")), "orders").await;

    let (status, seen) = call(
        front.addr,
        &[
            (
                "authorization",
                &format!("Bearer {}", token(&ed, good("alice"))),
            ),
            ("x-pillion-subject", "mallory"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["headers"]["x-pillion-subject"], "alice");
    assert_eq!(seen["headers"]["x-pillion-caller"], "front");

    let (status, e) = call(front.addr, &[]).await;
    assert_eq!(
        (status, &e["id"]),
        (401, &serde_json::json!("pillion.jwt")),
        "{e}"
    );
    let mut expired = good("alice");
    expired["exp"] = serde_json::json!(now() - 600);
    let (status, e) = call(
        front.addr,
        &[("authorization", &format!("Bearer {}", token(&ed, expired)))],
    )
    .await;
    assert_eq!(status, 401, "{e}");
    assert_eq!(app.requests(), 1, "only the valid call reached the app");
}

/// Feathers' default authentication: HS256 with the secret every app shares. The
/// subject may be another claim; a token without it passes without a subject unless
/// one is required; HS tokens are never checked against the JWKS, nor public-key ones
/// against the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_signed_with_a_shared_secret_are_verified_as_feathers_signs_them() {
    let secret = "feathers-shared-secret-0123456789";
    let hs = |alg: Algorithm, key: &str, claims: serde_json::Value| {
        let token = encode(
            &Header::new(alg),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap();
        format!("Bearer {token}")
    };
    let app = TestApp::start("app").await;
    let d = dir("secret");
    let file = d.join("secret");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let (_sc, addr) = inbound(
        &app.url(),
        &[
            "--jwt-secret-file",
            file.to_str().unwrap(),
            "--jwt-required",
        ],
    );
    // What Feathers' authentication service issues: sub is the user's id, a number
    // for many databases; aud and iss are Feathers' defaults.
    let feathers = serde_json::json!({
        "sub": 42, "aud": "https://yourdomain.com", "iss": "feathers", "exp": now() + 600,
    });
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let (status, seen) = call(
            addr,
            &[("authorization", &hs(alg, secret, feathers.clone()))],
        )
        .await;
        assert_eq!(status, 200, "{alg:?}: {seen}");
        assert_eq!(seen["headers"]["x-pillion-subject"], "42", "{seen}");
    }
    // Without a sub: it passes, with no subject.
    let anonymous = serde_json::json!({"exp": now() + 600, "userId": "u-7"});
    let (status, seen) = call(
        addr,
        &[(
            "authorization",
            &hs(Algorithm::HS256, secret, anonymous.clone()),
        )],
    )
    .await;
    assert_eq!(status, 200, "{seen}");
    assert!(seen["headers"].get("x-pillion-subject").is_none(), "{seen}");
    let refused = [
        (
            "another secret",
            hs(
                Algorithm::HS256,
                "not-the-shared-secret-000",
                feathers.clone(),
            ),
        ),
        (
            "expired",
            hs(
                Algorithm::HS256,
                secret,
                serde_json::json!({"sub": "x", "exp": now() - 3600}),
            ),
        ),
        (
            "a public-key token",
            format!("Bearer {}", token(&ed25519("ed-1"), good("eve"))),
        ),
    ];
    for (what, auth) in refused {
        let (status, body) = call(addr, &[("authorization", &auth)]).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["name"], "NotAuthenticated", "{what}: {body}");
    }

    // The subject from another claim, and required.
    let (_sc2, strict) = inbound(
        &app.url(),
        &[
            "--jwt-secret",
            secret,
            "--jwt-subject-claim",
            "userId",
            "--jwt-require-subject",
        ],
    );
    let (status, seen) = call(
        strict,
        &[("authorization", &hs(Algorithm::HS256, secret, anonymous))],
    )
    .await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["headers"]["x-pillion-subject"], "u-7");
    let (status, body) = call(
        strict,
        &[("authorization", &hs(Algorithm::HS256, secret, feathers))],
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("\"userId\""),
        "{body}"
    );

    // A short secret, or two of them, is refused at start.
    for (flags, says) in [
        (vec!["--jwt-secret", "short"], "at least 16"),
        (
            vec![
                "--jwt-secret",
                secret,
                "--jwt-secret-file",
                file.to_str().unwrap(),
            ],
            "keep one",
        ),
    ] {
        let mut args = vec![
            "run",
            "--listen",
            "127.0.0.1:0",
            "--app",
            "http://127.0.0.1:9",
        ];
        args.extend(flags);
        let (code, _, err) = common::run_to_end(&args, &[]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!err.contains(secret), "the secret is never shown: {err}");
    }
    let _ = std::fs::remove_dir_all(d);
}
