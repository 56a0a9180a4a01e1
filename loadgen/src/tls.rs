//! The devices' TLS client: the CA from the endpoint, a full handshake per connection unless
//! resumption is asked for, and chain verification cached per distinct chain.

use crate::BoxError;
use std::sync::{Arc, Mutex};

/// Verifies the server's chain once per distinct chain and name, then trusts that exact chain
/// again; the handshake signature (proof the server holds the key) is checked every time. A
/// fleet of devices each verifies the chain itself, but one simulator host need not spend its
/// share of the CPU on the same verification thousands of times.
#[derive(Debug)]
struct CachingVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    verified: Mutex<std::collections::HashSet<(Vec<u8>, String)>>,
}

impl rustls::client::danger::ServerCertVerifier for CachingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut chain = end_entity.to_vec();
        for i in intermediates {
            chain.extend_from_slice(i);
        }
        let key = (chain, format!("{server_name:?}"));
        if self.verified.lock().map(|v| v.contains(&key)).unwrap_or(false) {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        let ok = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if let Ok(mut v) = self.verified.lock() {
            v.insert(key);
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client configuration without resumption (every connection a full handshake), as a fleet
/// powering on for the first time does.
pub fn client_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let verifier = Arc::new(CachingVerifier { inner, verified: Mutex::new(Default::default()) });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// A device's own configuration for resumption: its own session store, so it resumes the
/// session it had (as a real device does), not a ticket another device left.
pub fn resuming(base: &Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    let mut cfg = (**base).clone();
    cfg.resumption = rustls::client::Resumption::store(Arc::new(rustls::client::ClientSessionMemoryCache::new(1)));
    Arc::new(cfg)
}

/// Presents one fixed certificate chain and key.
#[derive(Debug)]
struct OneCertificate(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for OneCertificate {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// `base` presenting a client certificate (an X.509 device's own configuration).
pub fn with_client_certificate(
    base: &Arc<rustls::ClientConfig>,
    cert: Vec<u8>,
    key_pkcs8: Vec<u8>,
) -> Result<Arc<rustls::ClientConfig>, BoxError> {
    let provider = rustls::crypto::ring::default_provider();
    let key = provider.key_provider.load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(key_pkcs8.into()))?;
    let certified = rustls::sign::CertifiedKey::new(vec![rustls::pki_types::CertificateDer::from(cert)], key);
    let mut cfg = (**base).clone();
    cfg.client_auth_cert_resolver = Arc::new(OneCertificate(Arc::new(certified)));
    Ok(Arc::new(cfg))
}
