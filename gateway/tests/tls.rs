#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! TLS: the server picks its ECDSA or RSA certificate by what the client offers, serves TLS 1.2
//! and 1.3, and can use an operator's own certificate files.

mod common;
use common::*;
use rustls::crypto::ring as provider;
use std::io::{Read, Write};
use std::sync::Arc;

fn roots(ca: &std::path::Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// Handshakes offering `suites` in that order over `versions`, checks the server answered an
/// HTTP request (401: no token), and returns the finished connection.
fn handshake(
    port: u16,
    ca: &std::path::Path,
    suites: Vec<rustls::SupportedCipherSuite>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConnection {
    let mut p = provider::default_provider();
    p.cipher_suites = suites;
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots(ca))
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    tls.write_all(b"GET /enrollments/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    let _ = tls.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    tls.conn
}

/// Handshakes with only the given TLS 1.2 suite and returns the server's leaf key algorithm.
fn handshake_with(port: u16, ca: &std::path::Path, suite: rustls::SupportedCipherSuite) -> String {
    let conn = handshake(port, ca, vec![suite], &[&rustls::version::TLS12]);
    let leaf = conn.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    cert.public_key().algorithm.algorithm.to_id_string()
}

/// Handshakes offering `suites` in that order (both TLS versions unless `tls12`); the suite
/// the server chose.
fn negotiated(port: u16, ca: &std::path::Path, suites: Vec<rustls::SupportedCipherSuite>, tls12: bool) -> rustls::CipherSuite {
    let versions: &[&'static rustls::SupportedProtocolVersion] =
        if tls12 { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13, &rustls::version::TLS12] };
    handshake(port, ca, suites, versions).negotiated_cipher_suite().unwrap().suite()
}

/// The server picks AES-128-GCM (SHA-256, which has CPU instructions) even from a client that
/// lists AES-256-GCM-SHA384 first, as OpenSSL and so the official SDKs do; a client that offers
/// only AES-256 is still served.
#[test]
fn the_server_prefers_aes_128_gcm() {
    let s = TestServer::start(test_config());
    let ca = s.ep.ca_certificate.clone().unwrap();
    use provider::cipher_suite::*;
    use rustls::CipherSuite as C;
    let tls13 = vec![TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256];
    assert_eq!(negotiated(s.ep.ports.https, &ca, tls13, false), C::TLS13_AES_128_GCM_SHA256);
    let tls12 = vec![TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256];
    assert_eq!(negotiated(s.ep.ports.https, &ca, tls12, true), C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
    assert_eq!(negotiated(s.ep.ports.https, &ca, vec![TLS13_AES_256_GCM_SHA384], false), C::TLS13_AES_256_GCM_SHA384);
}

const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";

#[test]
fn certificate_follows_the_client_offer() {
    let s = TestServer::start(test_config());
    let ca = s.ep.ca_certificate.clone().unwrap();
    let port = s.ep.ports.https;
    use provider::cipher_suite::*;
    assert_eq!(handshake_with(port, &ca, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256), RSA_ENCRYPTION);
    assert_eq!(handshake_with(port, &ca, TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384), RSA_ENCRYPTION);
    assert_eq!(handshake_with(port, &ca, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256), EC_PUBLIC_KEY);
    // TLS 1.3 (reqwest's default) gets the ECDSA certificate.
    assert_eq!(s.send("GET", "/enrollments/x", None).status().as_u16(), 404);
}

#[test]
fn operator_certificates_from_the_config() {
    // Certificates made by one instance, given to another through [tls].
    let first = TestServer::start(test_config());
    let certs = first.dir.path().join("certs");
    let mut cfg = test_config();
    cfg.tls.ecdsa_cert = Some(certs.join("server-ecdsa.pem"));
    cfg.tls.ecdsa_key = Some(certs.join("server-ecdsa.key"));
    cfg.tls.ca_cert = Some(certs.join("ca.pem"));
    let second = TestServer::start(cfg);
    assert_eq!(second.ep.ca_certificate.as_deref(), Some(certs.join("ca.pem").as_path()));
    assert!(!second.dir.path().join("certs").exists(), "no development CA generated");
    assert_eq!(second.send("GET", "/enrollments/x", None).status().as_u16(), 404);
    // A key without its certificate is refused at start-up with the key's name.
    let mut bad = test_config();
    bad.tls.ecdsa_cert = Some(certs.join("server-ecdsa.pem"));
    let err = dps_gateway::start(bad, tempfile::tempdir().unwrap().path()).err().unwrap();
    assert!(err.contains("ecdsa_key"), "{err}");
}

/// `cpus` pins shard i to `cpus[i]`, sets the shard count when `shards` is 0, and must list a
/// CPU for every shard.
#[test]
fn shards_follow_the_cpu_list() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = dps_gateway::config::Config::loopback();
    c.cpus = vec![0, 1];
    c.shards = 3;
    let err = dps_gateway::start(c.clone(), dir.path()).err().unwrap();
    assert!(err.contains("2 CPUs for 3 shards"), "{err}");
    c.shards = 0;
    c.cpus = vec![0];
    let running = dps_gateway::start(c, dir.path()).unwrap();
    let text = reqwest::blocking::get(format!("http://127.0.0.1:{}/metrics", running.endpoint.ports.admin)).unwrap().text().unwrap();
    assert!(text.contains("dps_cross_shard_pending{shard=\"0\"}"), "{text}");
    assert!(!text.contains("shard=\"1\""), "one shard only: {text}");
    running.shutdown().unwrap();
}
